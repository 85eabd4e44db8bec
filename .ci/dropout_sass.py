"""What the dropout mask costs in the GPU code: integer instructions per masked element, counted in the sm_90 SASS
of the LoRA kernels that regenerate it (no GPU needed; the cost model's ``kernels._mask.MASK_INT_OPS_PER_ELEMENT``).

For each kernel that masks (the forward's shrink-expand; the backward's pass over x and dX, ``_lora_da_kernel``
with WITH_DX) and each production
configuration (``kernels._target``'s block choosers at an H200's M = 2048 / 4224 / 8448), the kernel is compiled
twice for sm_90 with the same blocks - with dropout and without - through ``.ci/compile_triton.py``'s stub driver,
disassembled with the ``nvdisasm`` that ships with Triton, and the difference in instruction count is divided by
the elements one thread masks per tile (rows x cols / (32 x warps)).  Each kernel's masking code sits once in its
loop body, so the difference is the mask's per-tile cost.

    python .ci/dropout_sass.py [--csv out.csv]

About 2 minutes on 2 CPU cores.  Prints one row per (kernel, M, adapter dtype).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_triton as ct  # noqa: E402  (sets up the checkout's path and unsets TRITON_INTERPRET)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

KERNELS = {"_lora_shrink_expand_kernel": "BLOCK_K", "_lora_da_kernel": "BLOCK_K"}


def _sass_count(cubin: bytes) -> int:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/\s", line))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", help="write the rows here")
    args = ap.parse_args(argv)
    driver.set_active(ct._StubDriver(GPUTarget("cuda", 90, 32)))
    rec = ct.Recorder()
    rec.install()
    import fastpeft.kernels.lora as KL
    from fastpeft.kernels._target import LaunchTarget

    target = LaunchTarget(num_sms=ct.SMS[90], smem_per_block=ct.SHARED_LIMIT[90], capability_major=9,
                          compile_only=True)
    os.environ["FASTPEFT_TRITON_TMA"] = "0"
    # the configurations dropout selects, for the p = 0 compile too: the same tiles with and without the mask
    sk, se, da = KL.skinny_blocks, KL.shrink_expand_blocks, KL.da_blocks
    KL.skinny_blocks = lambda tgt, dropout=False: sk(tgt, True)
    KL.shrink_expand_blocks = lambda tgt, m, n, dropout=False: se(tgt, m, n, True)
    KL.da_blocks = lambda tgt, dropout=False, with_dx=False: da(tgt, True, with_dx)
    k = n = 512
    r = 16
    rows = []
    try:
        for m in (2048, 4224, 8448):
            for adt in (torch.bfloat16, torch.float32):
                got = {}
                for p in (0.0, 0.1):
                    rec.kernels.clear()
                    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
                    a, b = torch.randn(r, k, dtype=adt), torch.randn(n, r, dtype=adt)
                    y, s = KL.lora_fwd_triton(x, w, None, a, None, b, 2.0, p, 1234, target=target)
                    KL.lora_bwd_triton(torch.randn_like(y), x, w, a, None, b, s, 2.0, p, 1234, True, False,
                                       target=target)
                    for kr in rec.kernels:
                        if kr["kernel"] in KERNELS:
                            got[(kr["kernel"], p)] = (_sass_count(kr["compiled"].asm["cubin"]), kr["meta"])
                for name, col in KERNELS.items():
                    (n0, _), (n1, meta) = got[(name, 0.0)], got[(name, 0.1)]
                    per_thread = meta["BLOCK_M"] * meta[col] / (32 * meta["num_warps"])
                    rows.append(dict(kernel=name, M=m, adapters=str(adt).replace("torch.", ""),
                                     block_rows=meta["BLOCK_M"], block_cols=meta[col], warps=meta["num_warps"],
                                     sass_without=n0, sass_with=n1, elements_per_thread=per_thread,
                                     int_ops_per_element=round((n1 - n0) / per_thread, 1)))
    finally:
        KL.skinny_blocks, KL.shrink_expand_blocks, KL.da_blocks = sk, se, da
    print(f"triton {triton.__version__}, sm_90 SASS: instructions the dropout mask adds per masked element")
    for row in rows:
        print(f"{row['kernel']:<28} M={row['M']:<5} {row['adapters']:<8} "
              f"{row['block_rows']:>3} x {row['block_cols']:<3} {row['warps']} warps  "
              f"{row['sass_without']:>5} -> {row['sass_with']:>5} instructions, "
              f"{row['elements_per_thread']:g} elements/thread: {row['int_ops_per_element']}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
