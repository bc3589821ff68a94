"""Compile a Triton kernel for Hopper (sm_90) without a GPU and read its resource use from the cubin.

The interpreter that runs our Triton kernels on a CPU never compiles them, so compile failures and
register spills would only show on a lent GPU. Triton's own compiler targets sm_90 here; ``cuobjdump``
(shipped with Triton's NVIDIA backend) reads the registers, stack (spills) and shared memory. Integer
arguments get no divisibility hints, so loads may vectorise less than in a real launch: the numbers are
an upper bound. Run in a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def resource_usage(kernel, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
    """``{"REG": n, "STACK": bytes, "SHARED": bytes}`` of ``kernel`` compiled for sm_90. ``signature``
    types the runtime arguments (``"*bf16"``, ``"i32"``, ...); ``constexprs`` gives the compile-time ones."""
    source = ASTSource(kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")},
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = {}
    for word in usage.split():
        key, _, value = word.partition(":")
        if key in ("REG", "STACK", "SHARED") and value.isdigit():
            found[key] = max(found.get(key, 0), int(value))
    return found
