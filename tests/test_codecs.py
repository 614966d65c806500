"""gradzip.Codec: parsing, canonical form, equality, sizes, and the ops it configures."""

import dataclasses
import pickle

import gradzip
import pytest
import torch
from dist_helpers import TEST_BACKEND as BACKEND
from gradzip import Codec, reference
from gradzip import format as fmt


@pytest.mark.parametrize("spec,bits", [("int8", 8), ("int4", 4), ("int2", 2), ("sign", 1)])
def test_dense_specs(spec, bits):
    c = Codec(spec)
    assert (c.name, c.bits, c.block, c.rounding, c.is_sparse) == (spec, bits, 128, "nearest",
                                                                  False)
    assert (c.k, c.values, c.exact) == (None, None, None)
    assert str(c) == spec and repr(c) == f"Codec('{spec}')"


def test_topk_fraction_and_count():
    f = Codec("topk:0.01")
    assert (f.name, f.k, f.values, f.exact, f.bits) == ("topk", 0.01, "fp32", True, None)
    n = Codec("topk:1000")
    assert n.k == 1000 and isinstance(n.k, int)
    assert f.k_for(10_000) == 100 and f.k_for(10) == 1  # at least one entry
    assert n.k_for(10_000) == 1000 and n.k_for(300) == 300  # a count is clamped to numel
    assert Codec("topk:1e-3").k == 0.001


def test_options_in_spec_and_arguments_agree():
    a = Codec("int4,block=256,rounding=stochastic")
    b = Codec("int4", block=256, rounding="stochastic")
    c = Codec("INT4, block = 256 , rounding=Stochastic")
    assert a == b == c and hash(a) == hash(b) == hash(c)
    assert str(a) == "int4,block=256,rounding=stochastic"
    t = Codec("topk", k=0.05, values="bf16", exact=False)
    assert t == Codec("topk:0.05,values=bf16,exact=false")
    assert str(t) == "topk:0.05,values=bf16,exact=false"
    # defaults are the same codec whether spelled out or not
    assert Codec("int8,block=128,rounding=nearest") == Codec("int8")
    assert str(Codec("int8", block=128)) == "int8"


@pytest.mark.parametrize("spec", ["int8", "int2,block=4096", "sign,block=32",
                                  "int4,rounding=stochastic", "topk:0.001",
                                  "topk:7,values=int8", "topk:0.5,exact=false"])
def test_round_trip_pickle_and_hash(spec):
    c = Codec(spec)
    assert Codec(str(c)) == c
    assert pickle.loads(pickle.dumps(c)) == c
    assert len({c, Codec(spec)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.block = 64  # immutable: safe as a dict key


def test_fields_are_canonical_and_replace_reparses():
    c = Codec("INT4 , block=64")
    assert (c.name, c.k, c.block, c.rounding, c.values, c.exact, c.backend) == \
        ("int4", None, 64, "nearest", None, None, "auto")
    assert dataclasses.replace(c, rounding="stochastic") == Codec("int4,block=64,"
                                                                  "rounding=stochastic")
    with pytest.raises(ValueError, match="does not apply"):
        dataclasses.replace(c, values="bf16")
    t = dataclasses.replace(Codec("topk:0.01"), exact=False)
    assert str(t) == "topk:0.01,exact=false"


def test_backend_is_not_part_of_the_wire_spec():
    c = Codec("int4", backend="torch")
    assert c.spec == "int4" and str(c) == "int4,backend=torch"
    assert c != Codec("int4")  # a different configuration object ...
    assert c.header(1000) == Codec("int4").header(1000)  # ... but the same payloads


def test_count_one_and_fractions_differ():
    assert Codec("topk:1").k == 1
    with pytest.raises(ValueError, match="fraction"):
        Codec("topk:1.0")


@pytest.mark.parametrize("spec,k", [
    ("topk:k=2", 2), ("topk:2", 2), ("topk:K = 2", 2), ("topk,k=2", 2),
    ("topk:0.02", 0.02), ("topk:2%", 0.02), ("topk: 2 %", 0.02), ("topk:0.1%", 0.001),
    ("topk:12.5%", 0.125), ("topk:1e-3", 0.001), ("topk:99.5%", 0.995)])
def test_topk_amounts_are_read_by_how_they_are_written(spec, k):
    """A whole number is a count; a decimal or exponent in (0, 1), or a percentage, is a
    fraction. Percentages are converted in decimal, so '0.1%' is the float nearest to
    0.001, exactly as if it had been written '0.001'."""
    c = Codec(spec)
    assert c.k == k and type(c.k) is type(k)
    assert Codec(str(c)) == c


def test_a_count_is_written_k_equals():
    assert str(Codec("topk:2")) == "topk:k=2" == str(Codec("topk", k=2))
    assert str(Codec("topk:2%")) == "topk:0.02" == str(Codec("topk:0.02"))
    assert Codec("topk:2") != Codec("topk:2%")
    assert Codec("topk:2").k_for(1000) == 2 and Codec("topk:2%").k_for(1000) == 20


@pytest.mark.parametrize("spec", ["topk:2.0", "topk:1.0", "topk:1e2", "topk:k=0.02",
                                  "topk,k=0.5", "topk:150%", "topk:100%", "topk:0%",
                                  "topk:abc%", "topk:k=", "topk:k=two"])
def test_a_mistaken_amount_says_how_to_write_either(spec):
    with pytest.raises(ValueError) as e:
        Codec(spec)
    assert "'topk:2%'" in str(e.value) and "'topk:k=2'" in str(e.value), str(e.value)


def test_a_float_count_argument_is_refused_with_the_spellings():
    with pytest.raises(ValueError, match="topk:k=2"):
        Codec("topk", k=2.0)


@pytest.mark.parametrize("spec,kwargs,err,match", [
    ("int3", {}, ValueError, "unknown codec"),
    ("", {}, ValueError, "unknown codec"),
    ("topk", {}, ValueError, "needs an amount"),
    ("topk:abc", {}, ValueError, "neither a count"),
    ("topk:0", {}, ValueError, "at least 1"),
    ("topk:-0.5", {}, ValueError, "fraction"),
    ("topk:2.5", {}, ValueError, "fraction"),
    ("int8:5", {}, ValueError, "no ':' amount"),
    ("int8,block=100", {}, ValueError, "power of two"),
    ("int8,block=8192", {}, ValueError, "power of two"),
    ("int8,block=abc", {}, ValueError, "not an integer"),
    ("int8,rounding=up", {}, ValueError, "rounding must be"),
    ("sign,rounding=stochastic", {}, ValueError, "not defined for the 'sign'"),
    ("int8,values=bf16", {}, ValueError, "does not apply"),
    ("int8", {"exact": False}, ValueError, "does not apply"),
    ("int8", {"k": 5}, ValueError, "does not apply"),
    ("topk:5,block=64", {}, ValueError, "does not apply"),
    ("topk:5,values=fp8", {}, ValueError, "values must be"),
    ("topk:5,exact=maybe", {}, ValueError, "not a boolean"),
    ("int8,colour=red", {}, ValueError, "unknown codec option"),
    ("int8,block", {}, ValueError, "name=value"),
    ("int8,block=64", {"block": 256}, ValueError, "given twice"),
    ("int8", {"backend": "gpu"}, ValueError, "backend must be"),
    ("topk", {"k": "5"}, TypeError, "k must be"),
    ("topk", {"k": 5, "exact": 1}, TypeError, "exact must be"),
])
def test_bad_specs(spec, kwargs, err, match):
    with pytest.raises(err, match=match):
        Codec(spec, **kwargs)


def test_not_a_string():
    with pytest.raises(TypeError, match="spec must be a str"):
        Codec(8)


@pytest.mark.parametrize("numel", [1, 127, 128, 129, 1000, 123_457])
@pytest.mark.parametrize("spec", ["int8", "int4,block=64", "int2", "sign,block=1024",
                                  "topk:0.01", "topk:50,values=bf16", "topk:0.1,values=int8"])
def test_compressed_size_is_the_payload_size(spec, numel):
    c = Codec(spec, backend=BACKEND)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    payload = c.compress(x)
    assert payload.numel() == c.compressed_size(numel)
    assert fmt.parse_header(payload) == c.header(numel)


def test_compressed_size_formula():
    # dense: 64-byte header + 16-aligned scales + 16-aligned codes
    c = Codec("int4")
    n = 1_000_000
    nb = -(-n // 128)
    expect = 64 + -(-4 * nb // 16) * 16 + -(-(n * 4 // 8) // 16) * 16
    assert c.compressed_size(n) == expect
    t = Codec("topk:0.01")
    k = 10_000
    assert t.compressed_size(n) == 64 + -(-4 * k // 16) * 16 + -(-4 * k // 16) * 16
    assert c.compressed_size(0) == 0 and t.compressed_size(0) == 0
    with pytest.raises(ValueError):
        c.compressed_size(-1)


@pytest.mark.parametrize("spec", ["int8", "int4,rounding=stochastic", "sign", "topk:0.1",
                                  "topk:0.1,values=int8,exact=false"])
def test_compress_matches_reference(spec):
    """Codec.compress configures the public op exactly as the reference would be called."""
    c = Codec(spec, backend=BACKEND)
    x = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    r1 = torch.randn(3000, generator=torch.Generator().manual_seed(4)) * 0.1
    r2 = r1.clone()
    got = c.compress(x, r1, seed=77)
    if c.is_sparse:
        want = reference.topk_select(x, c.k_for(3000), r2, c.exact, c.values, 77)
    else:
        want = reference.quantize_pack(x, c.bits, c.block, r2, c.rounding, 77)
    assert torch.equal(got, want)
    assert torch.equal(r1, r2)
    out = torch.zeros(3000)
    c.decompress_accumulate(torch.stack([got, got]), out, 0.5)
    ref_out = torch.zeros(3000)
    reference.dequantize_accumulate(torch.stack([want, want]), ref_out, 0.5)
    assert torch.equal(out, ref_out)


def test_lazy_export():
    assert gradzip.Codec is Codec
    from gradzip.codecs import as_codec

    assert as_codec("int4") == Codec("int4") and as_codec(Codec("int2")) == Codec("int2")
    with pytest.raises(TypeError):
        as_codec(4)
