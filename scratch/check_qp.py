import sys, torch, itertools
sys.path.insert(0, 'python')
import gradzip
sys.path.insert(0, 'scratch')
from reffix import ref
torch.manual_seed(0)
isas = [a for a in ("scalar", "avx2", "avx512")]
bad = 0; cnt = 0
def eqf(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))
for isa in isas:
    torch.ops.gradzip._cpu_set_isa(isa)
    for n in [0, 1, 31, 33, 127, 129, 1000, 4097, 2**14 + 5]:
        for bits, block, dt, ef, stoch in itertools.product([8, 4, 2, 1], [32, 128, 4096], [torch.float32, torch.float16, torch.bfloat16], [False, True], [False, True]):
            if bits == 1 and stoch: continue
            if n > 5000 and block != 128: continue
            x = (torch.randn(n) * 3).to(dt)
            if n > 50:
                x[5] = 0; x[7] = -0.0
            r = torch.randn(n) * 0.1 if ef else None
            r1 = r.clone() if ef else None; r2 = r.clone() if ef else None
            rnd = "stochastic" if stoch else "nearest"
            p1 = ref.quantize_pack(x, bits, block, r1, rnd, 7)
            p2 = torch.ops.gradzip.quantize_pack(x, bits, block, r2, stoch, 7)
            cnt += 1
            ok = torch.equal(p1, p2) and (not ef or eqf(r1, r2))
            if not ok:
                bad += 1
                if bad < 10:
                    d = (p1 != p2).nonzero().flatten()
                    print("FAIL", isa, n, bits, block, dt, ef, stoch, d[:10], p1.numel(), (not ef or eqf(r1,r2)))
print("cases", cnt, "bad", bad)
