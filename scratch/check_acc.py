import sys, torch, itertools
sys.path.insert(0, 'python'); sys.path.insert(0, 'scratch')
import gradzip
from reffix import ref
torch.manual_seed(0)
bad = 0; cnt = 0
def same(a, b):
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a.view(torch.int16), b.view(torch.int16))
for isa in ("scalar", "avx2", "avx512"):
    torch.ops.gradzip._cpu_set_isa(isa)
    for n in [1, 31, 100, 1000, 4099, 40000]:
        codecs = [("dense", b, blk) for b in (8, 4, 2, 1) for blk in (32, 128, 4096)] + [("topk", vf, k) for vf in ("fp32", "bf16", "int8") for k in (1, max(1, n // 10), n)]
        for codec, W, odt, alpha in itertools.product(codecs, [1, 3, 8], [torch.float32, torch.float16, torch.bfloat16], [1.0, 0.125, -0.3]):
            if codec[0] == "dense":
                rows = [ref.quantize_pack(torch.randn(n) * (w + 1), codec[1], codec[2]) for w in range(W)]
            else:
                rows = [ref.topk_select(torch.randn(n), codec[2], None, True, codec[1]) for w in range(W)]
            P = torch.stack(rows)
            out = (torch.randn(n) * 2).to(odt)
            if n > 10: out[3] = -0.0
            o1 = out.clone(); o2 = out.clone()
            ref.dequantize_accumulate(P, o1, alpha)
            torch.ops.gradzip.dequantize_accumulate(P, o2, alpha)
            cnt += 1
            if not same(o1, o2):
                bad += 1
                if bad < 10:
                    d = (o1.float() != o2.float()).nonzero().flatten()
                    print("FAIL", isa, n, codec, W, odt, alpha, d[:5], o1[d[:3]], o2[d[:3]])
print("acc cases", cnt, "bad", bad)
