import sys, torch, itertools
sys.path.insert(0, 'python'); sys.path.insert(0, 'scratch')
import gradzip
from reffix import ref
torch.manual_seed(0)
bad = 0; cnt = 0
def eqf(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))
for isa in ("scalar", "avx2", "avx512"):
    torch.ops.gradzip._cpu_set_isa(isa)
    for n in [1, 2, 17, 100, 1000, 20000, 70001, 2**17 + 3]:
        for dt, ef, exact, vf in itertools.product([torch.float32, torch.float16, torch.bfloat16], [False, True], [True, False], ["fp32", "bf16", "int8"]):
            for k in sorted({1, max(1, n // 100), max(1, n // 3), n}):
                if n > 5000 and k == n: continue
                x = (torch.randn(n) * 3).to(dt)
                if n > 50: x[10:30] = 1.0  # ties
                r = torch.randn(n) * 0.1 if ef else None
                if ef and n > 50: r[10:30] = 0
                r1 = r.clone() if ef else None; r2 = r.clone() if ef else None
                p1 = ref.topk_select(x, k, r1, exact, vf, 5)
                p2 = torch.ops.gradzip.topk_select(x, k, r2, exact, gradzip.format.VALUE_FORMATS[vf], 5)
                cnt += 1
                ok = torch.equal(p1, p2) and (not ef or eqf(r1, r2))
                if not ok:
                    bad += 1
                    if bad < 10:
                        d = (p1 != p2).nonzero().flatten() if p1.numel() == p2.numel() else "size"
                        print("FAIL", isa, n, k, dt, ef, exact, vf, d[:10] if not isinstance(d, str) else d, p1.numel(), (not ef or eqf(r1, r2)))
print("topk cases", cnt, "bad", bad)
