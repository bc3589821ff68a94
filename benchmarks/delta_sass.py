"""Static instruction counts of the delta-layout CUDA kernel's main loop, no GPU needed (issue #7).

Builds ``csrc/cuda/delta_gemv.cu`` for sm_90 with nvcc, disassembles it with the ``cuobjdump`` that ships
with Triton, and for every bf16 instantiation prints its registers and the instructions of its innermost
loop that holds the shared loads and FMAs, per entry (a loop step does 8 entries per group). With loads a
step ahead (A = 1) the loop's static range also holds the rarely taken row change, so the count per entry
there is an upper bound.

    python benchmarks/delta_sass.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def main_loop(body: str, entries: int) -> int | None:
    """Instructions of the smallest backward-branch range holding a whole step: ``entries`` shared loads
    (one per entry, whatever the token count) and FMAs."""
    ins = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", body)]
    best = None
    for addr, text in ins:
        target = re.search(r"BRA (0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loop = [t for a, t in ins if int(target.group(1), 16) <= a <= addr]
            if sum("LDS" in t for t in loop) >= entries and any("FFMA" in t for t in loop):
                if best is None or len(loop) < best:
                    best = len(loop)
    return best


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "delta.cubin")
        subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90", f"-I{ROOT / 'csrc'}", "-cubin", "-o", cubin,
                        str(ROOT / "csrc/cuda/delta_gemv.cu")], check=True)
        sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    regs = dict(re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", usage))
    print("| tokens staged | D | A | registers | loop instructions | per entry |\n|---|---|---|---|---|---|")
    for func in re.split(r"\n\s+Function : ", sass)[1:]:
        name = func.split("\n")[0].strip()
        m = re.search(r"delta_gemv_kernelI13__nv_bfloat16Li(\d+)ELi(\d)ELb(\d)E", name)
        entries = 8 * int(m.group(2)) if m else 0
        loop = main_loop(func, entries) if m else None
        if loop:
            print(f"| {m.group(1)} | {m.group(2)} | {m.group(3)} | {regs.get(name, '?')} | {loop} | "
                  f"{loop / entries:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
