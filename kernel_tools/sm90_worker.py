"""Compiles captured Triton modules for sm_90 and reports what the GPU would execute.

Runs inside the pinned triton environment (requirements-sm90.txt), not
the project's: it imports only the standard library and `triton`. Driven by
tools/gpu/compile_kernel_sm90.py, which captures the modules with jax and reads
this script's JSON back:

    <triton-venv>/bin/python kernel_tools/sm90_worker.py DIR

DIR holds kernels.json ([{"id", "ttir", "num_warps", "num_stages"}, ...], the
"ttir" entries being file names in DIR); the report goes to DIR/report.json
and each kernel's TTGIR and PTX to DIR/<id>.ttgir, DIR/<id>.ptx.

Per kernel: registers, spill bytes and shared memory from ptxas -v on the PTX
Triton emits (the same ptxas Triton runs to make the cubin), and from the
pipelined TTGIR of the inner loop: how many buffers each shared-memory tile
has, the depth of `ttg.async_wait` in the loop, and the global loads that the
pipeliner left as plain (blocking) loads in the loop.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback

SM = 90
WARP_SIZE = 32


# --------------------------------------------------------------------------
# TTGIR analysis (text only, so it is testable without triton)
# --------------------------------------------------------------------------
def loop_bodies(ttgir: str) -> list[str]:
    """The text of every innermost `scf.for` body, by brace matching."""
    bodies = []
    for match in re.finditer(r"\bscf\.for\b", ttgir):
        # The region opens with the `{` that ends the op's line; earlier braces on
        # that line belong to attributes such as #ttg.slice<{dim = 1, ...}>.
        line_end = ttgir.find("\n", match.end())
        line_end = len(ttgir) if line_end < 0 else line_end
        open_at = ttgir.rfind("{", match.end(), line_end)
        if open_at < 0 or ttgir[open_at + 1 : line_end].strip():
            continue
        depth, i = 0, open_at
        while i < len(ttgir):
            if ttgir[i] == "{":
                depth += 1
            elif ttgir[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        body = ttgir[open_at + 1 : i]
        if not re.search(r"\bscf\.for\b", body):
            bodies.append(body)
    return bodies


_MEMDESC = re.compile(r"!ttg\.memdesc<([0-9x]+)x(bf16|f16|f32|i8|i32|i1|f8E4M3FN|f8E5M2)")


def shared_buffers(ttgir: str) -> list[dict]:
    """Shared-memory allocations: {"shape": [...], "dtype", "buffers"} (leading dim of a 3-D tile = buffers)."""
    out = []
    for line in ttgir.splitlines():
        if "ttg.local_alloc" not in line:
            continue
        m = _MEMDESC.search(line.split("->")[-1]) or _MEMDESC.search(line)
        if not m:
            continue
        shape = [int(d) for d in m.group(1).split("x")]
        out.append({"shape": shape, "dtype": m.group(2), "buffers": shape[0] if len(shape) >= 3 else 1})
    return out


# Ops that only move a value on to the next iteration: a load whose results reach nothing else
# was issued for a later iteration, and its latency hides behind this one's work.
_FORWARDING_OPS = ("ttg.convert_layout", "scf.yield")


def _used_in_iteration(body: str, value: str) -> bool:
    """Whether an SSA value defined in a loop body feeds this iteration's work (its forward
    slice in the body reaches an op other than layout conversions and the yield)."""
    live, used = {value}, False
    for line in body.splitlines():
        rhs = line.split("=", 1)[-1] if re.match(r"\s*%", line) else line
        uses = {u.split("#")[0] for u in re.findall(r"%[\w#]+", rhs)}
        if not uses & live:
            continue
        op = re.match(r"\s*([a-z_]+\.[a-z_.]+)\b", rhs)
        if op is None or op.group(1) not in _FORWARDING_OPS:
            used = True
        defined = re.match(r"\s*(%[\w#]+)", line)
        if defined:
            live.add(defined.group(1).split("#")[0])
    return used


def loop_report(ttgir: str) -> dict:
    """What the software pipeliner made of the kernel's inner loop(s)."""
    bodies = loop_bodies(ttgir)
    waits, blocking, ahead, plain_scalar_loads, async_copies = [], [], [], 0, 0
    for body in bodies:
        waits += [int(n) for n in re.findall(r"ttg\.async_wait[^\n]*\{num = (\d+) : i32\}", body)]
        async_copies += len(re.findall(r"ttg\.async_copy_global_to_local", body))
        for line in body.splitlines():
            if not re.search(r"\btt\.load\b", line):
                continue
            result_type = re.sub(r"\s*loc\(.*\)\s*$", "", line).rsplit(" : ", 1)[-1].strip()
            if "tensor<" not in result_type:
                plain_scalar_loads += 1
                continue
            value = re.match(r"\s*(%[\w#]+)", line).group(1)
            (blocking if _used_in_iteration(body, value) else ahead).append(result_type)
    return {
        "loops": len(bodies),
        "async_copies_in_loop": async_copies,
        "async_wait_num_in_loop": waits,
        # plain (not async-copied) tensor loads in the loop whose value this iteration waits for
        "plain_tensor_loads_in_loop": blocking,
        # plain tensor loads issued one iteration ahead (carried to the next iteration)
        "plain_tensor_loads_ahead": ahead,
        "plain_scalar_loads_in_loop": plain_scalar_loads,
    }


# --------------------------------------------------------------------------
# PTX and ptxas
# --------------------------------------------------------------------------
def ptx_report(ptx: str) -> dict:
    """The pipeline as PTX states it (comparable with the PTX XLA dumps on a GPU): the
    `cp.async.wait_group N` values (N > 0: copies stay in flight across a wait) and the
    number of async copy instructions."""
    return {
        "ptx_wait_groups": [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)],
        "ptx_async_copies": len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global", ptx)),
    }


def ptxas_report(text: str) -> dict:
    """Registers, spill bytes, shared memory and stack from `ptxas -v` output."""

    def number(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    registers = re.search(r"Used (\d+) registers", text)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "static_smem_bytes": number(r"(\d+) bytes smem"),
    }


def _ptxas_binaries() -> list[str]:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    names = ["ptxas", "ptxas-blackwell"]
    return [os.path.join(bin_dir, n) for n in names if os.path.exists(os.path.join(bin_dir, n))]


def ptxas_verbose(ptx_path: str) -> tuple[str, str]:
    """(binary, output) of `ptxas -v` for sm_90a; tries the wheel's ptxas builds in turn (the
    plain one may not know the PTX version Triton emits)."""
    errors = []
    for binary in _ptxas_binaries():
        cmd = [binary, "-v", f"--gpu-name=sm_{SM}a", ptx_path, "-o", os.devnull]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return os.path.basename(binary), proc.stdout + proc.stderr
        errors.append(f"{os.path.basename(binary)}: {proc.stderr.strip()[:500]}")
    raise RuntimeError("no ptxas accepted the PTX: " + " | ".join(errors))


def ptxas_entry(text: str, name: str) -> str:
    """The part of `ptxas -v` output about one entry function (a module may hold several)."""
    parts = re.split(r"(?=ptxas info\s*: Compiling entry function )", text)
    mine = [part for part in parts if f"'{name}'" in part.split("\n", 1)[0]]
    return mine[0] if mine else ""


def run_ptxas(ptx_path: str) -> tuple[str, dict]:
    binary, text = ptxas_verbose(ptx_path)
    return binary, ptxas_report(text)


# --------------------------------------------------------------------------
# Compile
# --------------------------------------------------------------------------
def compile_one(directory: str, entry: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(directory, entry["ttir"])
    options = {"num_warps": entry["num_warps"], "num_stages": entry["num_stages"]}
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # XLA's Triton fuses mul+add too
    kernel = triton.compile(path, target=GPUTarget("cuda", SM, WARP_SIZE), options=options)
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    stem = os.path.join(directory, entry["id"])
    with open(stem + ".ttgir", "w") as f:
        f.write(ttgir)
    with open(stem + ".ptx", "w") as f:
        f.write(ptx)
    ptxas_used, regs = run_ptxas(stem + ".ptx")
    return {
        "id": entry["id"],
        "ok": True,
        "ptxas": ptxas_used,
        "shared_bytes": int(getattr(kernel.metadata, "shared", 0)),
        **regs,
        **ptx_report(ptx),
        "shared_buffers": shared_buffers(ttgir),
        **loop_report(ttgir),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    directory = argv[0]
    with open(os.path.join(directory, "kernels.json")) as f:
        entries = json.load(f)
    import triton

    results = []
    for entry in entries:
        try:
            results.append(compile_one(directory, entry))
        except Exception as err:  # one failing config must not hide the others
            results.append({"id": entry["id"], "ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                            "traceback": traceback.format_exc()[-2000:]})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "traceback"}), flush=True)
    with open(os.path.join(directory, "report.json"), "w") as f:
        json.dump({"triton_version": triton.__version__, "target": f"cuda:{SM}", "kernels": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
