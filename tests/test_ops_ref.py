"""The reference ops (``fastpeft.ops``) and custom ops ``torch.ops.fastpeft.*`` against independent fp64 math.

Covers: lora_fwd_ref / lora_bwd_ref / ia3_fwd_ref / ia3_bwd_ref vs formulas written here (outputs and every
gradient), ``torch.library.opcheck`` on every custom op with several argument sets, and the seeded dropout stream
(Philox-4x32-10 known-answer vectors, an independent pure-Python Philox and 8-per-call extraction, pinned mask
bits, the p16 threshold and unbiased scale, keep fraction).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import fastpeft  # noqa: F401  (registers the custom ops)
from fastpeft.ops import dropout as D
from fastpeft.ops import ia3 as I
from fastpeft.ops import lora as L

from testing_utils import ELEMENTWISE, KEEP_FRACTION_SIGMAS

F64 = torch.float64
ATOL64, RTOL64 = ELEMENTWISE[F64]


def _close64(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, atol=ATOL64, rtol=RTOL64, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# An independent Philox-4x32-10 (pure Python ints, full 4-word counter) and the reference math
# ---------------------------------------------------------------------------------------------------------------

M32 = 0xFFFFFFFF


def philox_py(ctr, key):
    """Philox-4x32-10 of Salmon et al.; ctr = 4 uint32, key = 2 uint32 -> 4 uint32."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def p16_py(p):
    """min(round_half_even(p * 65536), 65535) with exact rational arithmetic (independent of float rounding)."""
    t = Fraction(p) * 65536
    fl = t.numerator // t.denominator
    rem = t - fl
    up = rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1)
    return min(fl + (1 if up else 0), 65535)


def u16_py(seed, m, k):
    """The stream's 16-bit uniform of element (m, k): one Philox call per 8 columns of a row."""
    r = philox_py((k >> 3, m & M32, m >> 32, 0), (seed & M32, (seed >> 32) & M32))
    j = k & 7
    return (r[j >> 1] >> (16 * (j & 1))) & 0xFFFF


def keep_py(seed, m, k, p):
    return u16_py(seed, m, k) >= p16_py(p)


def mask64(seed, m, k, p):
    if p == 0.0:
        return torch.ones(m, k, dtype=F64)
    keep = D.dropout_keep_mask(seed, (m, k), p)
    # The stream's contract: kept values are multiplied by fp32(65536 / (65536 - p16)) on every backend and dtype.
    return keep.to(F64) * float(torch.tensor(65536.0 / (65536 - p16_py(p)), dtype=torch.float32))


def lora_math(x, W, b, A, e, B, s, drop_scale):
    """y = x Wᵀ + b + s ((x ⊙ drop_scale) Aᵀ ⊙ e) Bᵀ in fp64 (drop_scale = keep · scale or ones)."""
    y = x @ W.t()
    if b is not None:
        y = y + b
    t = (x * drop_scale) @ A.t()
    if e is not None:
        t = t * e
    return y + s * (t @ B.t())


def ia3_math(x, W, b, l, feedforward):
    if feedforward:
        y = (x * l) @ W.t()
        return y + b if b is not None else y
    z = x @ W.t()
    if b is not None:
        z = z + b
    return z * l


def _rand(*shape, dtype=F64, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# ---------------------------------------------------------------------------------------------------------------
# Dropout stream
# ---------------------------------------------------------------------------------------------------------------


def test_philox_known_answer_vectors():
    # Random123's published kat_vectors for philox4x32_10.
    assert philox_py((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox_py((M32,) * 4, (M32, M32)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox_py((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == \
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)
    # fastpeft's vectorised version on the one KAT it can express (c2 = c3 = 0)
    assert int(D.philox4x32_10(0, *(torch.tensor([0]),) * 4)[0][0]) == 0x6627E8D5


def test_philox_matches_independent_python():
    g = torch.Generator().manual_seed(1)
    ctr = [torch.randint(0, 2 ** 32, (64,), generator=g, dtype=torch.int64) for _ in range(4)]
    for seed in (0, 1, 12345, 2 ** 40 + 17, 2 ** 63 - 1):
        key = (seed & M32, (seed >> 32) & M32)
        got = D.philox4x32_10(seed, ctr[0], ctr[1], 0 * ctr[0], 0 * ctr[0])[0].tolist()
        want = [philox_py((a, b, 0, 0), key)[0] for a, b in zip(ctr[0].tolist(), ctr[1].tolist())]
        assert got == want, f"seed {seed}"
        # all four words, all four counter words
        words = [w.tolist() for w in D.philox4x32_10(seed, *ctr)]
        want4 = [philox_py(tuple(c[i] for c in (t.tolist() for t in ctr)), key) for i in range(64)]
        assert list(zip(*words)) == want4, f"seed {seed} (4 words)"
    # the full known-answer vectors through the vectorised version
    kat = D.philox4x32_10((0x299F31D0 << 32) | 0xA4093822, *(torch.tensor([v]) for v in
                                                            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)))
    assert [int(w) for w in kat] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_uniform16_matches_definition_word_halves_in_k_order():
    # seed 0, row 0, columns 0..7 use counter (0, 0, 0, 0): the KAT words split low half first
    u = D.dropout_uniform16(0, (1, 8))[0].tolist()
    assert u == [0xE8D5, 0x6627, 0xC58D, 0xE169, 0xAC4C, 0xBC57, 0xDBD8, 0x9B00]
    for seed, (m, k), off in ((3, (5, 13), 0), (2 ** 33 + 5, (3, 21), 7), (11, (2, 9), 2 ** 32 - 1)):
        got = D.dropout_uniform16(seed, (m, k), row_offset=off)
        want = torch.tensor([[u16_py(seed, off + r, c) for c in range(k)] for r in range(m)])
        assert torch.equal(got, want), (seed, m, k, off)


def test_keep_mask_matches_definition_incl_high_counter_words():
    p = 0.37
    for seed in (3, 2 ** 33 + 5):
        m = D.dropout_keep_mask(seed, (5, 13), p)
        want = torch.tensor([[keep_py(seed, r, c, p) for c in range(13)] for r in range(5)])
        assert torch.equal(m, want)
    # row_offset large enough that rows >= 2**32 use counter word c2
    k = 7
    off = 2 ** 32 - 1
    m = D.dropout_keep_mask(11, (3, k), 0.5, row_offset=off)
    want = torch.tensor([[keep_py(11, off + r, c, 0.5) for c in range(k)] for r in range(3)])
    assert torch.equal(m, want)
    # a group of 8 never straddles rows: row m of a chunk does not depend on K or on the other rows
    full = D.dropout_keep_mask(5, (4, 30), 0.5)
    assert torch.equal(D.dropout_keep_mask(5, (2, 19), 0.5, row_offset=2), full[2:, :19])


# The stream is shared by every backend and must never change silently: pin a few masks bit for bit.  These rows
# were computed with the pure-Python definition above (philox_py + u16_py + p16_py), not by fastpeft.
PINNED_MASKS = {
    # (seed, p, M, K): rows of '1' (keep) / '0' (drop)
    (0, 0.5, 2, 16): ["1011111111000110", "1001000000110100"],
    (42, 0.1, 2, 16): ["1111101111111101", "1111110111111111"],
    (2 ** 40 + 7, 0.5, 3, 8): ["10010011", "00011100", "00100000"],
    (7, 0.3, 2, 13): ["1111101011111", "1010111110000"],
}
PINNED_WORDS = {  # (seed, i) -> first Philox output word of counter (i & 0xffffffff, i >> 32, 0, 0)
    (0, 0): 0x6627E8D5,
    (0, 1): 0xF8E4CCA4,
    (1234, 2 ** 32 + 5): 0x039DA951,
}


def test_pinned_philox_words():
    for (seed, i), word in PINNED_WORDS.items():
        zero = torch.tensor([0])
        got = int(D.philox4x32_10(seed, torch.tensor([i & M32]), torch.tensor([i >> 32]), zero, zero)[0][0])
        assert got == word, f"(seed={seed}, i={i}): {got:#x} != {word:#x}"
        assert philox_py((i & M32, i >> 32, 0, 0), (seed & M32, (seed >> 32) & M32))[0] == word


def test_pinned_masks():
    for (seed, p, m, k), rows in PINNED_MASKS.items():
        got = D.dropout_keep_mask(seed, (m, k), p)
        got_rows = ["".join("1" if v else "0" for v in row) for row in got.tolist()]
        assert got_rows == rows, f"seed={seed} p={p}: {got_rows}"
        # the pins are the definition's, not just a snapshot of the code
        assert ["".join("1" if keep_py(seed, r, c, p) else "0" for c in range(k)) for r in range(m)] == rows


@pytest.mark.parametrize("p", [0.0, 1e-9, 2 ** -17, 3 * 2 ** -17, 0.1, 0.3, 0.5, 0.9, 0.99999, 1 - 2 ** -40])
def test_dropout_threshold(p):
    p16, scale = D.dropout_threshold(p)
    assert p16 == p16_py(p)
    assert scale == float(torch.tensor(65536.0 / (65536 - p16), dtype=torch.float32))
    assert D.dropout_scale(p) == scale
    # ties round half to even: 2**-17 -> 0.5 -> 0, 3 * 2**-17 -> 1.5 -> 2
    if p == 2 ** -17:
        assert p16 == 0
    if p == 3 * 2 ** -17:
        assert p16 == 2


def test_dropout_threshold_p01_and_bad_p():
    assert D.dropout_threshold(0.1) == (6554, float(torch.tensor(65536 / 58982, dtype=torch.float32)))
    for bad in (-0.1, 1.0, 1.5, float("nan"), "x", None):
        with pytest.raises(ValueError, match="dropout p"):
            D.dropout_threshold(bad)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_effective_drop_probability_and_unbiased_scale(p):
    """The drop probability is exactly p16 / 65536 over the uniforms' range, and the scale makes E[drop(x)] = x for
    it: over all 65536 values of u16, exactly p16 are dropped, and (65536 - p16) * scale / 65536 = 1 to fp32
    rounding of the scale.  Empirically, on many elements, the drop fraction estimates p16 / 65536 and the mean of
    drop(1) estimates 1."""
    p16, scale = D.dropout_threshold(p)
    assert sum(1 for u in range(65536) if not u >= p16) == p16  # keep = u16 >= p16, u16 uniform on [0, 65536)
    assert abs((65536 - p16) * scale / 65536 - 1.0) <= 2 ** -24
    if p == 0.1:
        assert p16 == 6554
    n_rows, k = 512, 1000
    keep = D.dropout_keep_mask(99, (n_rows, k), p)
    n = keep.numel()
    p_eff = p16 / 65536
    sigma = (p_eff * (1 - p_eff) / n) ** 0.5
    assert abs((1 - keep.double().mean().item()) - p_eff) <= KEEP_FRACTION_SIGMAS * sigma
    y = D.seeded_dropout(torch.ones(n_rows, k, dtype=F64), p, 99)
    mean_sigma = scale * sigma
    assert abs(y.mean().item() - 1.0) <= KEEP_FRACTION_SIGMAS * mean_sigma
    # the 16-bit uniforms are uniform: each of the 8 lanes of a group (k & 7) has mean ~ 32767.5
    u = D.dropout_uniform16(3, (n_rows, 1024)).double()
    lane_means = u.view(n_rows, 128, 8).mean(dim=(0, 1))
    lane_sigma = (65536 ** 2 / 12 / (n_rows * 128)) ** 0.5
    assert ((lane_means - 32767.5).abs() <= KEEP_FRACTION_SIGMAS * lane_sigma).all(), lane_means


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction(p):
    n_rows, k = 256, 997
    keep = D.dropout_keep_mask(2024, (n_rows, k), p)
    n = keep.numel()
    frac = keep.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) <= KEEP_FRACTION_SIGMAS * sigma, f"keep fraction {frac} vs {1 - p}"
    # rows and columns are not degenerate (the index really feeds the counter)
    assert keep.any(1).all() if p < 0.9 else True
    assert not torch.equal(keep[0], keep[1])


def test_dropout_scale_and_seeded_dropout():
    p = 0.3
    assert D.dropout_scale(p) == float(torch.tensor(65536 / (65536 - 19661), dtype=torch.float32))
    x = torch.randn(6, 10)
    y = D.seeded_dropout(x, p, 5)
    keep = D.dropout_keep_mask(5, (6, 10), p)
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))
    assert torch.equal(y[keep], x[keep] * D.dropout_scale(p))
    assert D.seeded_dropout(x, 0.0, 5) is x


# ---------------------------------------------------------------------------------------------------------------
# LoRA reference forward / backward vs fp64 math
# ---------------------------------------------------------------------------------------------------------------

LORA_SHAPES = [  # (M, K, N, r)
    (1, 5, 7, 1), (0, 6, 4, 2), (9, 17, 33, 3), (16, 32, 16, 8), (13, 31, 19, 4),
]


@pytest.mark.parametrize("m,k,n,r", LORA_SHAPES)
@pytest.mark.parametrize("with_e", [False, True])
@pytest.mark.parametrize("p,seed", [(0.0, 0), (0.4, 77)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_ref_fwd_bwd_vs_math(m, k, n, r, with_e, p, seed, with_bias):
    x, W, A, B = _rand(m, k), _rand(n, k), _rand(r, k), _rand(n, r)
    b = _rand(n) if with_bias else None
    e = _rand(r) if with_e else None
    s = 0.7
    y, S = L.lora_fwd_ref(x, W, b, A, e, B, s, p, seed)
    dscale = mask64(seed, m, k, p)
    _close64(y, lora_math(x, W, b, A, e, B, s, dscale), "y")
    # S is promote_types(A.dtype, float32) by contract: fp64 here, so dB/dE keep fp64 precision
    assert S.dtype == torch.promote_types(A.dtype, torch.float32)
    _close64(S, (x * dscale) @ A.t(), "S")
    # gradients: autograd of the independent fp64 expression
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
    xe, Ae, Be = leaves
    ee = e.detach().clone().requires_grad_(True) if with_e else None
    be = b.detach().clone().requires_grad_(True) if with_bias else None
    dy = _rand(m, n)
    lora_math(xe, W, be, Ae, ee, Be, s, dscale).backward(dy)
    dx, dA, dE, dB, db = L.lora_bwd_ref(dy, x, W, A, e, B, S, s, p, seed, True, with_bias)
    _close64(dx, xe.grad, "dx")
    _close64(dA, Ae.grad, "dA")
    _close64(dB, Be.grad, "dB")
    if with_e:
        _close64(dE, ee.grad, "dE")
    else:
        assert dE.numel() == 0
    if with_bias:
        _close64(db, be.grad, "dbias")
    else:
        assert db.numel() == 0
    dx2, *_ = L.lora_bwd_ref(dy, x, W, A, e, B, S, s, p, seed, False, with_bias)
    assert dx2.numel() == 0


def test_lora_fp64_adapter_gradients_keep_fp64_precision():
    """Regression: S used to be stored in float32 always, so with fp64 adapters dB and dE (computed from S) carried
    fp32 rounding (~1e-8 relative).  S is now kept in ``promote_types(float32, lora_A.dtype)``."""
    m, k, n, r = 6, 11, 5, 3
    x, W, A, B, e = _rand(m, k), _rand(n, k), _rand(r, k), _rand(n, r), _rand(r)
    y, S = L.lora_fwd_ref(x, W, None, A, e, B, 0.5, 0.0, 0)
    dy = _rand(m, n)
    _, _, dE, dB, _ = L.lora_bwd_ref(dy, x, W, A, e, B, S, 0.5, 0.0, 0, False, False)
    Ae, Be, ee = (t.clone().requires_grad_(True) for t in (A, B, e))
    lora_math(x, W, None, Ae, ee, Be, 0.5, torch.ones(m, k, dtype=F64)).backward(dy)
    _close64(dB, Be.grad, "dB (fp64 adapters)")
    _close64(dE, ee.grad, "dE (fp64 adapters)")


def test_lora_ref_upcast_is_fp64_ground_truth():
    x, W, b, A, B = (t.float() for t in (_rand(5, 9), _rand(6, 9), _rand(6), _rand(2, 9), _rand(6, 2)))
    y, S = L.lora_fwd_ref(x, W, b, A, None, B, 1.5, 0.0, 0, upcast=True)
    assert y.dtype == F64 and S.dtype == F64
    _close64(y, lora_math(x.double(), W.double(), b.double(), A.double(), None, B.double(), 1.5,
                          torch.ones(5, 9, dtype=F64)), "y upcast")


def test_lora_ref_dx_is_masked_under_dropout():
    """The fused-LoRA bug (fms-acceleration#97): the LoRA part of dx must carry the dropout mask and the scale."""
    m, k, n, r, p, seed = 8, 24, 10, 4, 0.5, 99
    x, W, A, B = _rand(m, k), _rand(n, k), _rand(r, k), _rand(n, r)
    y, S = L.lora_fwd_ref(x, W, None, A, None, B, 2.0, p, seed)
    dy = _rand(m, n)
    dx, *_ = L.lora_bwd_ref(dy, x, W, A, None, B, S, 2.0, p, seed, True, False)
    keep = D.dropout_keep_mask(seed, (m, k), p)
    base_dx = dy @ W
    lora_dx = (2.0 * dy @ B) @ A
    assert (~keep).any() and keep.any()
    _close64(dx[~keep], base_dx[~keep], "dropped elements get only the base gradient")
    scale = float(torch.tensor(65536.0 / (65536 - p16_py(p)), dtype=torch.float32))
    _close64(dx[keep], base_dx[keep] + lora_dx[keep] * scale, "kept elements")


# ---------------------------------------------------------------------------------------------------------------
# IA3 reference forward / backward vs fp64 math
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 5, 7), (0, 4, 3), (9, 17, 33), (12, 31, 19)])
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_ia3_ref_fwd_bwd_vs_math(m, k, n, feedforward, with_bias):
    x, W = _rand(m, k), _rand(n, k)
    b = _rand(n) if with_bias else None
    lv = _rand(k if feedforward else n)
    y, saved = I.ia3_fwd_ref(x, W, b, lv, feedforward)
    _close64(y, ia3_math(x, W, b, lv, feedforward), "y")
    xe, le = x.clone().requires_grad_(True), lv.clone().requires_grad_(True)
    be = b.clone().requires_grad_(True) if with_bias else None
    dy = _rand(m, n)
    ia3_math(xe, W, be, le, feedforward).backward(dy)
    x_arg = x if feedforward else x.new_empty(0)
    dx, dl, db = I.ia3_bwd_ref(dy, x_arg, W, lv, saved, feedforward, True, with_bias)
    _close64(dx, xe.grad, "dx")
    _close64(dl, le.grad, "dl")
    if with_bias:
        _close64(db, be.grad, "dbias")
    else:
        assert db.numel() == 0


# ---------------------------------------------------------------------------------------------------------------
# opcheck on the custom ops
# ---------------------------------------------------------------------------------------------------------------

# Skip the (slow) aot-dispatch check on all but one argument set: the others are covered by schema/fake/autograd.
_FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _lora_fwd_args(m, k, n, r, with_e, with_bias, p, seed, strided_w=False, dtype=F64):
    x = _rand(m, k, dtype=dtype, grad=True)
    W = _rand(k, n, dtype=dtype).t() if strided_w else _rand(n, k, dtype=dtype)
    b = _rand(n, dtype=dtype) if with_bias else None
    A, B = _rand(r, k, dtype=dtype, grad=True), _rand(n, r, dtype=dtype, grad=True)
    e = _rand(r, dtype=dtype, grad=True) if with_e else None
    return (x, W, b, A, e, B, 0.5, p, seed, "torch")


LORA_OPCHECK_CASES = [
    dict(m=4, k=6, n=5, r=3, with_e=True, with_bias=True, p=0.3, seed=7, full=True),
    dict(m=0, k=6, n=5, r=2, with_e=False, with_bias=True, p=0.0, seed=0),
    dict(m=1, k=17, n=3, r=1, with_e=False, with_bias=False, p=0.0, seed=0),
    dict(m=5, k=9, n=11, r=3, with_e=False, with_bias=True, p=0.5, seed=123, strided_w=True),
    dict(m=3, k=8, n=8, r=2, with_e=True, with_bias=False, p=0.2, seed=5, dtype=torch.float32),
]


@pytest.mark.parametrize("case", LORA_OPCHECK_CASES, ids=lambda c: f"m{c['m']}k{c['k']}r{c['r']}p{c['p']}")
def test_opcheck_lora_fwd(case):
    case = dict(case)
    full = case.pop("full", False)
    args = _lora_fwd_args(**case)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") \
        if full else _FAST_UTILS
    torch.library.opcheck(torch.ops.fastpeft.lora_fwd.default, args, test_utils=utils)


@pytest.mark.parametrize("case", LORA_OPCHECK_CASES, ids=lambda c: f"m{c['m']}k{c['k']}r{c['r']}p{c['p']}")
@pytest.mark.parametrize("needs_dx", [True, False])
def test_opcheck_lora_bwd(case, needs_dx):
    case = dict(case)
    case.pop("full", False)
    x, W, b, A, e, B, s, p, seed, be = _lora_fwd_args(**case)
    x, A, B = x.detach(), A.detach(), B.detach()
    e = e.detach() if e is not None else None
    _, S = L.lora_fwd_ref(x, W, b, A, e, B, s, p, seed)
    dy = _rand(x.shape[0], W.shape[0], dtype=x.dtype)
    args = (dy, x, W, A, e, B, S, s, p, seed, needs_dx, b is not None, be)
    torch.library.opcheck(torch.ops.fastpeft.lora_bwd.default, args, test_utils=_FAST_UTILS)


IA3_OPCHECK_CASES = [(4, 6, 5, False, True), (4, 6, 5, True, True), (0, 3, 2, False, True), (1, 7, 9, True, False),
                     (3, 5, 4, False, False)]


@pytest.mark.parametrize("m,k,n,ff,with_bias", IA3_OPCHECK_CASES)
def test_opcheck_ia3_fwd_bwd(m, k, n, ff, with_bias):
    x = _rand(m, k, grad=True)
    W = _rand(n, k)
    b = _rand(n, grad=True) if with_bias else None
    lv = _rand(k if ff else n, grad=True)
    utils = _FAST_UTILS + (("test_aot_dispatch_dynamic",) if (m, ff) == (4, True) else ())
    torch.library.opcheck(torch.ops.fastpeft.ia3_fwd.default, (x, W, b, lv, ff, "torch"), test_utils=utils)
    y, saved = I.ia3_fwd_ref(x.detach(), W, None if b is None else b.detach(), lv.detach(), ff)
    dy = _rand(m, n)
    x_arg = x.detach() if ff else x.new_empty(0)
    for needs_dx in (True, False):
        torch.library.opcheck(torch.ops.fastpeft.ia3_bwd.default,
                              (dy, x_arg, W, lv.detach(), saved, ff, needs_dx, with_bias, "torch"),
                              test_utils=_FAST_UTILS)


def test_custom_op_lora_fwd_equals_ref_and_autograd():
    x, W, b, A, e, B, s, p, seed, be = _lora_fwd_args(7, 10, 6, 3, True, True, 0.25, 31)
    y, S = torch.ops.fastpeft.lora_fwd(x, W, b, A, e, B, s, p, seed, be)
    y_ref, S_ref = L.lora_fwd_ref(x.detach(), W, b, A.detach(), e.detach(), B.detach(), s, p, seed)
    _close64(y, y_ref, "y")
    _close64(S, S_ref, "S")
    dy = _rand(7, 6)
    y.backward(dy)
    xe, Ae, Be, ee = (t.detach().clone().requires_grad_(True) for t in (x, A, B, e))
    lora_math(xe, W, b, Ae, ee, Be, s, mask64(seed, 7, 10, p)).backward(dy)
    _close64(x.grad, xe.grad, "dx")
    _close64(A.grad, Ae.grad, "dA")
    _close64(B.grad, Be.grad, "dB")
    _close64(e.grad, ee.grad, "dE")


@pytest.mark.parametrize("m,k,r", [(513, 1408, 16), (2049, 300, 1), (1000, 17, 16), (600, 64, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_torch_path_chunks_are_bit_equal_to_autograd(m, k, r, dtype):
    """The torch path's shrink and tail (``fastpeft.ops.lora._Shrink`` / ``_ScaledDeltaAdd``) cast a 16-bit input in
    row / column chunks instead of whole; every output and gradient equals autograd on PEFT's op sequence
    (``x.to(fp32) @ Aᵀ``; ``(base.to(fp32) + (se @ Bᵀ) * s).to(dtype)``) bit for bit - shapes with several chunks,
    a remainder chunk, r = 1 (CPU BLAS runs a one-column GEMM as a GEMV)."""
    from fastpeft.ops._chunks import spans
    from fastpeft.ops.lora import _ScaledDeltaAdd, _Shrink
    assert len(spans(m)) > 1
    g = torch.Generator().manual_seed(m + k + r)
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
    a = torch.randn(r, k, generator=g, requires_grad=True)
    ds = torch.randn(m, r, generator=g)
    want = x.to(torch.float32) @ a.t()
    got = _Shrink.apply(x, a)
    assert torch.equal(got, want)
    for w, v in zip(torch.autograd.grad(want, (x, a), ds), torch.autograd.grad(got, (x, a), ds)):
        assert torch.equal(w, v)
    base = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
    se = torch.randn(m, r, generator=g, requires_grad=True)
    b = torch.randn(k, r, generator=g, requires_grad=True)
    dy = torch.randn(m, k, generator=g).to(dtype)
    want = (base.to(torch.float32) + (se @ b.t()) * 2.0).to(dtype)
    got = _ScaledDeltaAdd.apply(base, se, b, 2.0, dtype)
    assert torch.equal(got, want)
    for w, v in zip(torch.autograd.grad(want, (base, se, b), dy), torch.autograd.grad(got, (base, se, b), dy)):
        assert torch.equal(w, v)


@pytest.mark.parametrize("shape", [(4, 256, 1408), (3000, 17), (2049, 600), (7, 5), (2, 129, 1000), (1, 3001)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ia3_torch_path_chunks_are_bit_equal_to_autograd(shape, dtype):
    """IA3's scaling on the torch path (``fastpeft.ops.ia3._ScaleByVector``) forms dl in fine column chunks and y / dt
    in fine row chunks (``spans(n, fine=True)``: up to 32, of >= 64, remainders); output and both gradients equal
    autograd on PEFT's ``(t * l).to(dtype)`` bit for bit."""
    from fastpeft.ops._chunks import spans
    if shape[-1] >= 128:     # several column chunks (and, with >= 128 rows, row chunks) are driven
        assert len(spans(shape[-1], fine=True)) > 1
    g = torch.Generator().manual_seed(sum(shape))
    t = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    lv = torch.randn(shape[-1], generator=g, requires_grad=True)
    dy = torch.randn(*shape, generator=g).to(dtype)
    want = (t * lv).to(dtype)
    got = I._ScaleByVector.apply(t, lv, dtype)
    assert torch.equal(got, want)
    for w, v in zip(torch.autograd.grad(want, (t, lv), dy), torch.autograd.grad(got, (t, lv), dy)):
        assert torch.equal(w, v)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dora_torch_path_scales_in_chunks_bit_equal_to_autograd(dtype, with_bias):
    """DoRA on the torch backend: ``k ⊙ z (+ b)`` through ``_ScaleByVector`` (fp32 copies of z in chunks) gives the
    output and every gradient (x, A, B, magnitude, a trainable bias) of the plain ``(k * z + b).to(dtype)`` bit for
    bit."""
    import fastpeft.functional as FN
    from fastpeft.ops import dora as D
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 96, generator=g).to(dtype)
    w = torch.randn(640, 96, generator=g).to(dtype)
    a = (torch.randn(4, 96, generator=g) * 0.1).requires_grad_()
    b = (torch.randn(640, 4, generator=g) * 0.1).requires_grad_()
    m = (torch.rand(640, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(640, generator=g).to(dtype).requires_grad_() if with_bias else None
    dy = torch.randn(2, 300, 640, generator=g).to(dtype)

    def run(plain):
        xx = x.clone().requires_grad_()
        if plain:
            norm = D.dora_norm_ref(w, a.detach(), b.detach(), 2.0, None)
            z = FN.lora_linear(xx, w, None, a, b, 2.0, backend="torch")
            y = (m / norm.to(a.dtype)) * z
            y = (y if bias is None else y + bias).to(z.dtype)
        else:
            y = FN.dora_linear(xx, w, bias, a, b, m, 2.0, backend="torch")
        return (y, *torch.autograd.grad(y, (xx, a, b, m) + ((bias,) if with_bias else ()), dy))
    for want, got in zip(run(True), run(False)):
        assert want.dtype == got.dtype and torch.equal(want, got)


def test_ia3_scaling_leaves_its_saved_input_intact():
    """dl's column chunks multiply out of place: with t already in the compute dtype (IA3 input mode: x cast to
    fp32 l's dtype) and a 16-bit dY, an in-place product would overwrite the saved t, and a second backward
    (``retain_graph=True``) would get another dl."""
    g = torch.Generator().manual_seed(9)
    t = torch.randn(300, 200, generator=g).requires_grad_()        # fp32 = the compute dtype
    lv = torch.randn(200, generator=g, requires_grad=True)
    dy = torch.randn(300, 200, generator=g).to(torch.bfloat16)
    y = I._ScaleByVector.apply(t, lv, torch.bfloat16)
    first = torch.autograd.grad(y, (t, lv), dy, retain_graph=True)
    second = torch.autograd.grad(y, (t, lv), dy)
    want = torch.autograd.grad((t * lv).to(torch.bfloat16), (t, lv), dy)
    for a, b, w in zip(first, second, want):
        assert torch.equal(a, b) and torch.equal(a, w)
