"""HBM bytes per instruction of a compiled TPU program, grouped by what the instruction does.

XLA's `cost_analysis()` gives one "bytes accessed" figure for a whole program. To see what moves
the bytes, this reads the compiled HLO (`compiled.as_text()`, saved by `tpu_aot.py unet --hlo-dir`)
and counts, for each instruction of the entry computation, the operands and results that live in
HBM (memory space 0; TPU layouts mark VMEM as `S(1)`); an async copy or slice into VMEM counts the
bytes it fetches. Each instruction's kind (fusion kind, custom call, copy...) and the JAX primitive
at the end of its `op_name` name the group. A count of what each instruction touches once, so a
kernel that re-reads a block (the Pallas flash kernels) counts its operands once: `flash.traffic`
has their re-reads.

It also sums the compiler's own cost-model estimate of each XLA instruction (`estimated_cycles`
in the backend config of the compiled HLO; none for a Pallas kernel): a second estimate of where
the time goes, which counts what a byte or FLOP count cannot (layouts, a reduction's shape).

    python benchmarks/hlo_bytes.py unet_gradient_b8.hlo [--clock-ghz 1.5]
"""

from __future__ import annotations

import argparse
import collections
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*?)\)(?:, |$)")
# v5e's TensorCore clock: 197 TFLOP/s of bf16 = 4 MXUs x 128 x 128 multiply-adds x 2 x 1.5 GHz.
V5E_CLOCK_GHZ = 1.5
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "reshape", "copy-done", "slice-done"}


def arrays(text: str) -> list[tuple[int, int]]:
    """(bytes, memory space) of each array type in an HLO type string, e.g. a tuple's elements."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        space = re.search(r"S\((\d+)\)", layout or "")
        out.append((n * DTYPE_BYTES[dtype], int(space.group(1)) if space else 0))
    return out


def entry_lines(hlo: str) -> list[str]:
    start = hlo.index("\nENTRY")
    return hlo[start: hlo.index("\n}\n", start)].splitlines()[2:]


def _instructions(hlo: str):
    """(group, HBM bytes moved, the compiler's estimated cycles or 0) per entry instruction; group
    is (pass, instruction kind, primitive), pass "backward" where the op_name is a transpose
    (JAX's reverse mode), else "forward"."""
    results: dict[str, list] = {}
    for line in entry_lines(hlo):
        m = _INSTR.match(line)
        if not m:
            continue
        name, result, op, operands = m.groups()
        results[name] = arrays(result)
        if op in _FREE:
            continue
        ins = [a for ref in re.findall(r"%([\w.\-]+)", operands) for a in results.get(ref, [])]
        outs = results[name]
        if op == "copy-start":  # HBM -> VMEM prefetch: the source's bytes
            moved = sum(b for b, space in ins if space == 0)
        elif op == "slice-start":  # the slice that lands in VMEM
            moved = sum(b for b, space in outs if space == 1)
        else:
            moved = sum(b for b, space in ins + outs if space == 0)
        if op == "fusion":
            op = "fusion/" + re.search(r"kind=(\w+)", line).group(1)
        elif op == "custom-call":
            op = "custom-call/" + re.search(r'custom_call_target="([^"]*)"', line).group(1)
        found = re.search(r'op_name="([^"]*)"', line)
        op_name = found.group(1) if found else ""
        cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
        phase = "backward" if "transpose(" in op_name else "forward"
        yield (phase, op, op_name.split("/")[-1]), moved, int(cycles.group(1)) if cycles else 0


def hbm_bytes(hlo: str) -> collections.Counter:
    """{(pass, instruction kind, primitive): HBM bytes} over the entry computation's instructions."""
    groups: collections.Counter = collections.Counter()
    for group, moved, _ in _instructions(hlo):
        groups[group] += moved
    return groups


def compiler_cycles(hlo: str) -> collections.Counter:
    """{(pass, instruction kind, primitive): cycles}: the TPU compiler's own cost-model estimate
    of each XLA instruction (`estimated_cycles` in its backend config), a second view of where
    the time goes. Custom calls (the Pallas kernels) carry none."""
    groups: collections.Counter = collections.Counter()
    for group, _, cycles in _instructions(hlo):
        groups[group] += cycles
    return groups


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hlo", help="a compiled TPU program's HLO text")
    parser.add_argument("--clock-ghz", type=float, default=V5E_CLOCK_GHZ, help="the chip's clock, for the cycle estimates")
    args = parser.parse_args(argv)
    with open(args.hlo) as f:
        hlo = f.read()
    groups = hbm_bytes(hlo)
    total = sum(groups.values())
    print(f"{args.hlo}: {total / 1e9:.2f} GB in HBM operands and results of the entry computation's instructions")
    print("| GB | share | pass | instruction | JAX primitive |\n|---|---|---|---|---|")
    for (phase, op, prim), b in groups.most_common(24):
        print(f"| {b / 1e9:.2f} | {100 * b / total:.0f}% | {phase} | {op} | {prim or '-'} |")
    for phase in ("forward", "backward"):
        print(f"{phase}: {sum(b for k, b in groups.items() if k[0] == phase) / 1e9:.2f} GB")
    cycles = compiler_cycles(hlo)
    ms = lambda c: c / (args.clock_ghz * 1e6)
    print(f"\nthe compiler's estimate, XLA instructions only (no Pallas kernel): {ms(sum(cycles.values())):.1f} ms")
    print("| ms | pass | instruction | JAX primitive |\n|---|---|---|---|")
    for (phase, op, prim), c in cycles.most_common(16):
        print(f"| {ms(c):.2f} | {phase} | {op} | {prim or '-'} |")


if __name__ == "__main__":
    main()
