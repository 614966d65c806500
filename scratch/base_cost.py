import sys, time, torch
sys.path.insert(0, 'bench'); sys.path.insert(0, 'python')
import kernels as K
torch.set_num_threads(1)
n = 2**24
t0 = time.perf_counter()
for case in K.all_cases():
    s = K.State
    c0 = time.thread_time(); w0 = time.perf_counter()
    st = case.build(n, torch.device("cpu"))
    c1 = time.thread_time(); 
    st.torch_baseline(); c2 = time.thread_time()
    st.agree(); c3 = time.thread_time()
    st.run("cpu"); c4 = time.thread_time()
    print(f"{case.op:22s} {case.config:34s} build {c1-c0:6.2f} torch {c2-c1:6.2f} agree {c3-c2:6.2f} cpu {c4-c3:6.3f}  wall {time.perf_counter()-w0:.1f}")
print("total wall", time.perf_counter() - t0)
