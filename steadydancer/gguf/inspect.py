"""Describe a GGUF file: architecture, tensor count, per-type counts and sizes, pose path.

    python -m steadydancer.gguf.inspect FILE [--tensors]

Exit status 0 when the file is a usable SteadyDancer model, 1 otherwise (unreadable, not
Wan, pose path missing: the output says which). Reads only the header: instant on 14B files.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import SteadyDancerError
from ..keys import POSE_PATH_KEYS, missing_pose_path
from .dequant import SUPPORTED_QTYPES
from .loader import check_architecture
from .reader import read_gguf


@dataclass
class TypeStats:
    tensors: int = 0
    nbytes: int = 0
    elements: int = 0


@dataclass
class InspectReport:
    path: str
    file_size: int
    architecture: str | None  # as declared in the file
    wan: bool  # declared 'wan', or undeclared with the Wan key set
    problem: str | None  # why the file is not a usable Wan model, if it is not
    tensors: int
    types: dict[str, TypeStats]
    missing_pose_path: list[str]
    unsupported: list[str]
    reshaped: list[str]
    tensor_rows: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.wan and not self.missing_pose_path and not self.unsupported


def inspect_file(path: str | os.PathLike[str]) -> InspectReport:
    """Header facts of a GGUF file; raises GGUFError when it cannot be parsed at all."""
    with read_gguf(path) as file:
        types: dict[str, TypeStats] = {}
        rows = []
        for t in file:
            stats = types.setdefault(t.qtype.name, TypeStats())
            stats.tensors += 1
            stats.nbytes += t.nbytes
            stats.elements += t.n_elements
            rows.append((t.name, t.qtype.name, t.shape, t.nbytes))
        problem = None
        try:
            check_architecture(file)
        except SteadyDancerError as exc:
            problem = str(exc)
        return InspectReport(
            path=file.path,
            file_size=os.path.getsize(file.path),
            architecture=file.architecture,
            wan=problem is None,
            problem=problem,
            tensors=len(file.tensors),
            types=dict(sorted(types.items())),
            missing_pose_path=missing_pose_path(file.tensors),
            unsupported=[
                f"{t.name} ({t.qtype.name})" for t in file if t.qtype not in SUPPORTED_QTYPES
            ],
            reshaped=[t.name for t in file if t.shape != t.stored_shape],
            tensor_rows=rows,
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_report(report: InspectReport, *, tensors: bool = False) -> str:
    arch = report.architecture if report.architecture is not None else "(not declared)"
    lines = [
        f"file:          {report.path} ({_mib(report.file_size)})",
        f"architecture:  {arch}" + ("" if report.wan else "  -> not a Wan model"),
        f"tensors:       {report.tensors}",
        "types:",
    ]
    for name, s in report.types.items():
        bits = 8 * s.nbytes / s.elements if s.elements else 0.0
        lines.append(
            f"  {name:<6} {s.tensors:>5} tensors  {_mib(s.nbytes):>12}  {bits:5.2f} bits/weight"
        )
    if report.reshaped:
        lines.append(
            f"reshaped:      {len(report.reshaped)} tensors stored flat, shape from orig_shape metadata"
        )
    n_pose = len(POSE_PATH_KEYS)
    if not report.missing_pose_path:
        lines.append(f"pose path:     present ({n_pose} tensors)")
    elif len(report.missing_pose_path) == n_pose:
        lines.append(
            f"pose path:     ABSENT: a plain Wan2.1 file, not SteadyDancer (none of the {n_pose} tensors)"
        )
    else:
        lines.append(
            f"pose path:     INCOMPLETE: {len(report.missing_pose_path)} of {n_pose} tensors missing: "
            + ", ".join(report.missing_pose_path)
        )
    if report.unsupported:
        lines.append("unsupported:   " + ", ".join(report.unsupported))
    if report.problem:
        lines.append(f"problem:       {report.problem}")
    lines.append("usable:        " + ("yes" if report.usable else "no"))
    if tensors:
        lines.append("")
        for name, qtype, shape, nbytes in report.tensor_rows:
            lines.append(f"  {name:<60} {qtype:<6} {list(shape)!s:<24} {nbytes:>12,} B")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steadydancer.gguf.inspect", description="Describe a SteadyDancer GGUF file."
    )
    parser.add_argument("file", help="a .gguf file")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor")
    args = parser.parse_args(argv)
    try:
        report = inspect_file(args.file)
    except SteadyDancerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report, tensors=args.tensors))
    return 0 if report.usable else 1


if __name__ == "__main__":
    raise SystemExit(main())
