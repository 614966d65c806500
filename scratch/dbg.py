import sys, torch
sys.path.insert(0, 'python')
import gradzip
from gradzip import reference as ref
torch.manual_seed(0)
torch.ops.gradzip._cpu_set_isa("scalar")
for it in range(200):
    x = (torch.randn(1000) * 3).to(torch.bfloat16)
    p1 = ref.quantize_pack(x, 8, 128); p2 = torch.ops.gradzip.quantize_pack(x, 8, 128, None, False, 0)
    if not torch.equal(p1, p2):
        d = (p1 != p2).nonzero().flatten()
        print(d, p1[d], p2[d])
        i = d[0].item() - 64 - 32  # codes offset = 64 + align16(4*8)=96
        b = i // 128
        v = x.float()[b*128:(b+1)*128]
        amax = v.abs().max(); inv = 127 / amax
        t = v[i % 128] * inv
        print(v[i%128].item(), amax.item(), inv.item(), t.item(), torch.round(t).item(), (v*inv)[i%128].item())
        break
for isa in ["scalar","avx2","avx512"]:
    torch.ops.gradzip._cpu_set_isa(isa)
    p2 = torch.ops.gradzip.quantize_pack(x, 8, 128, None, False, 0)
    print(isa, p2[d], torch.equal(p1,p2))
