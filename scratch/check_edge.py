import sys, torch, itertools, random
sys.path.insert(0, 'python'); sys.path.insert(0, 'scratch')
import gradzip
from reffix import ref
from gradzip import format as fmt
torch.manual_seed(1)
bad = 0; cnt = 0
def same(a, b):
    if a.dtype == torch.float32: return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a.view(torch.int16), b.view(torch.int16))
def special(n, dt):
    x = torch.randn(n) * 2
    if n > 300:
        x[100] = float('inf'); x[200] = float('nan'); x[250] = -float('inf')
        x[1000 % n] = 3e38; x[1001 % n] = -3.3e38; x[5:40] = 0; x[41] = 1e-40; x[42] = -1e-45
    return x.to(dt)
for isa in ("scalar", "avx2", "avx512"):
    torch.ops.gradzip._cpu_set_isa(isa)
    for n in [2**20 + 3, 5000]:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            base = special(n, dt)
            # non-contiguous: every other element of a 2n buffer, viewed 2-D
            buf = torch.zeros(2 * n, dtype=dt); buf[::2] = base
            xs = {"contig": base, "strided": buf[::2], "2d-t": base[: (n // 7) * 7].view(7, -1).t()}
            for name, x in xs.items():
                m = x.numel()
                for bits, stoch in [(8, False), (4, True), (2, False), (1, False)]:
                    r = torch.randn(m) * 0.1
                    if m > 300: r[300] = float('nan')
                    r1, r2 = r.clone(), r.clone()
                    rnd = "stochastic" if stoch else "nearest"
                    p1 = ref.quantize_pack(x, bits, 256, r1, rnd, 3)
                    p2 = gradzip.quantize_pack(x, bits, 256, r2, rnd, 3)
                    cnt += 1
                    if not (torch.equal(p1, p2) and same(r1, r2)):
                        bad += 1; print("QFAIL", isa, n, dt, name, bits, torch.equal(p1, p2), same(r1, r2))
                if n < 10000:
                    for exact, vf in itertools.product([True, False], ["fp32", "bf16", "int8"]):
                        r = torch.randn(m) * 0.1
                        r1, r2 = r.clone(), r.clone()
                        p1 = ref.topk_select(x, 50, r1, exact, vf, 3)
                        p2 = gradzip.topk_select(x, 50, r2, exact, vf, 3)
                        cnt += 1
                        if not (torch.equal(p1, p2) and same(r1, r2)):
                            bad += 1; print("TFAIL", isa, n, dt, name, exact, vf, torch.equal(p1, p2), same(r1, r2))
print("edge cases", cnt, "bad", bad)
# accumulate with non-finite payloads, out with inf/nan, -0
for isa in ("scalar", "avx2", "avx512"):
    torch.ops.gradzip._cpu_set_isa(isa)
    n = 4099
    for odt in (torch.float32, torch.float16, torch.bfloat16):
        for kind in ["dense8", "dense1", "topk-int8", "topk-bf16"]:
            rows = []
            for w in range(3):
                x = special(n, torch.float32)
                rows.append(ref.quantize_pack(x, 8 if kind == "dense8" else 1, 128) if kind.startswith("dense")
                            else ref.topk_select(x, 400, None, True, kind.split("-")[1]))
            P = torch.stack(rows)
            out = (torch.randn(n) * 3).to(odt); out[7] = -0.0; out[8] = float('inf'); out[9] = float('nan')
            for alpha in (1.0, -0.5, 0.0):
                o1, o2 = out.clone(), out.clone()
                ref.dequantize_accumulate(P, o1, alpha); gradzip.dequantize_accumulate(P, o2, alpha)
                cnt += 1
                # NaN payload bits are not specified: compare NaN positions, other bits exactly
                n1, n2 = o1.float().isnan(), o2.float().isnan()
                ok = torch.equal(n1, n2) and same(torch.where(n1, 0, o1.float()).to(odt), torch.where(n2, 0, o2.float()).to(odt))
                strict = same(o1, o2)
                if not ok:
                    bad += 1; print("AFAIL", isa, odt, kind, alpha)
                elif not strict:
                    print("nan-bits differ", isa, odt, kind, alpha)
print("with accumulate", cnt, "bad", bad)
