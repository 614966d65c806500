"""int64 indices (numel >= 2**31): top-k and sparse accumulate on a 4 GiB bf16 tensor."""
import sys, time, torch
sys.path.insert(0, 'python')
import gradzip
from gradzip import format as fmt
torch.set_num_threads(2)
n = 2**31 + 37
t0 = time.time()
x = torch.zeros(n, dtype=torch.bfloat16)
plant = {3: 5.0, 2**31 - 1: -7.0, 2**31: 9.0, n - 1: -11.0, 1000: 3.0, 2**31 + 5: 1.0}
for i, v in plant.items():
    x[i] = v
k = 5
want = sorted(sorted(plant, key=lambda i: -abs(plant[i]))[:k])
for exact in (True, False):
    p = gradzip.topk_select(x, k, None, exact, "fp32")
    h = fmt.parse_header(p)
    assert h.index_format == fmt.INDEX_INT64, h
    off, ln = h.sections()["indices"]; voff, vln = h.sections()["values"]
    idx = p[off:off + ln].view(torch.int64).tolist(); vals = p[voff:voff + vln].view(torch.float32).tolist()
    print("exact" if exact else "approx", idx == want, idx, vals, f"{time.time() - t0:.0f}s")
    assert idx == want and vals == [plant[i] for i in want]
del x
out = torch.zeros(n, dtype=torch.bfloat16)
gradzip.dequantize_accumulate(torch.stack([p, p]), out, 0.5)
nz = out.nonzero().flatten().tolist()
print("accumulate", nz == want, [out[i].item() for i in nz], f"{time.time() - t0:.0f}s")
assert nz == want and [out[i].item() for i in nz] == [plant[i] for i in want]
print("int64 OK")
