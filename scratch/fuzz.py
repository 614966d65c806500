import sys, torch, random
sys.path.insert(0, 'python')
import gradzip
from gradzip import format as fmt
random.seed(0); torch.manual_seed(0)
n = 3000
good = [gradzip.quantize_pack(torch.randn(n), b, 64) for b in (8, 4, 2, 1)] + \
       [gradzip.topk_select(torch.randn(n), 100, None, True, v) for v in ("fp32", "bf16", "int8")]
stats = {"ok": 0, "ValueError": 0, "other": {}}
def attempt(rows, out):
    try:
        torch.ops.gradzip.dequantize_accumulate(rows, out, 1.0); stats["ok"] += 1
    except ValueError:
        stats["ValueError"] += 1
    except Exception as e:  # anything else is a finding
        stats["other"][type(e).__name__] = stats["other"].get(type(e).__name__, 0) + 1
for it in range(20000):
    p = random.choice(good).clone()
    mode = random.random()
    if mode < 0.4:  # flip random bytes anywhere
        for _ in range(random.randint(1, 8)):
            p[random.randrange(p.numel())] = random.randrange(256)
    elif mode < 0.7 and p[6] == 2:  # top-k: corrupt an index
        h = fmt.parse_header(p); off, ln = h.sections()["indices"]
        idx = p[off:off + ln].view(torch.int32)
        j = random.randrange(idx.numel())
        idx[j] = random.choice([-1, n, n + 5, 2**31 - 1, -2**31, idx[j - 1].item() if j else 0, random.randrange(n)])
    elif mode < 0.8:  # truncate / extend
        p = p[: random.randrange(p.numel())] if random.random() < 0.5 else torch.cat([p, torch.zeros(16, dtype=torch.uint8)])
    else:  # header field changes
        p[random.randrange(64)] = random.randrange(256)
    out = torch.zeros(n)
    attempt(p.unsqueeze(0), out)
    if random.random() < 0.1:  # mixed with a good one
        q = random.choice(good)
        if q.numel() == p.numel():
            attempt(torch.stack([q, p]), torch.zeros(n))
print(stats)
# explicit messages
p = gradzip.topk_select(torch.randn(n), 100)
h = fmt.parse_header(p); off, ln = h.sections()["indices"]
for val, j in [(n, 5), (-3, 0), (None, 7)]:
    q = p.clone(); idx = q[off:off+ln].view(torch.int32)
    idx[j] = idx[j - 1] if val is None else val
    try:
        gradzip.dequantize_accumulate(q, torch.zeros(n), backend="cpu"); print("NO ERROR")
    except ValueError as e:
        print("ValueError:", e)
