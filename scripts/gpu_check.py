"""One check of the pack on a GPU machine, in under 10 minutes, with one report.

1. The precision matrix of tests/test_precision_matrix.py on CUDA: every node's main path on tiny
   SD1.5 and SDXL in float16, bfloat16, float8_e4m3fn weights with manual cast to bfloat16 (where the card
   computes in bfloat16) and float32 partially loaded (--lowvram), each against float32 on the same card,
   with ComfyUI's default attention kernel for that card; each cell's relative error, its tolerance,
   its time and peak GPU memory.
2. Every bench/*.py --gpu (real SD1.5 512x512 and SDXL 1024x1024 shapes, random weights), each in a
   child process under a share of the time left: its ratio tables and its peak GPU memory.

The report goes to --out (default ./gpu_report): report.md to read and report.json (the same
sections: environment, matrix, benches) to compare. Nothing is downloaded: models are random weights
built in the process.

    make gpu-check                                   # on the newest ComfyUI host (scripts/hosts.py run)
    python scripts/hosts.py run scripts/gpu_check.py --out /tmp/report
    python scripts/hosts.py run scripts/gpu_check.py --dry-run   # CPU, tiny: checks the script itself

--dry-run runs on the CPU in about a minute: a few matrix cells on tiny SD1.5, and each bench only up
to its argument parsing (`--help`, which must list --gpu), so CI-like machines can check this script.
The exit status is 1 when a cell is outside its tolerance or a bench failed or ran out of time.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHES = sorted((REPO / "bench").glob("*.py"))
DEADLINE_S = 570  # the whole check, matrix and benches, stays under 10 minutes
DRY_RUN_CELLS = {"architectures": ["sd15"], "paths": ["vsp_in_batch", "style_aligned_in_batch", "ddim_inversion"],
                 "variants": ["fp16", "bf16", "fp8", "lowvram"]}
PEAK_MARK = "GPU_CHECK_PEAK "
HELP_MARK = "GPU_CHECK_HELP "
TABLE_ROW = re.compile(r"^\s+(?P<label>\S.*?)\s+(?P<seconds>[\d.]+) s\s+(?P<ratio>[\d.]+)x (?P<baseline>.+)$")
RATIO_ROW = re.compile(r"^\s+(?P<label>\S.*?)\s+ratio\s+(?P<ratio>[\d.]+)")


# ---- children: each runs in its own process, on the host's python, and prints or writes JSON ----

def matrix_child(output: Path, dry_run: bool) -> None:
    """Run the precision matrix's cells in this process and write them to output as JSON."""
    sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]
    import comfyui_host

    comfyui_host.prepare(cpu=dry_run)
    import asyncio

    import torch

    import comfy.ldm.modules.attention
    import comfy.model_management
    import comfyui_version
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    import test_precision_matrix as matrix

    cuda = torch.cuda.is_available() and not dry_run
    if cuda:  # cuDNN convolutions default to TF32 (10-bit mantissa): the reference must be float32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    variants = list(matrix.VARIANTS)
    skipped = {}
    if cuda and not torch.cuda.is_bf16_supported():
        skipped = {"bf16": "no bfloat16 on this card", "fp8": "manual cast computes in bfloat16: none on this card"}
    cells = DRY_RUN_CELLS if dry_run else {"architectures": list(matrix.ARCHITECTURES), "paths": list(matrix.PATHS),
                                           "variants": [v for v in variants if v not in skipped]}
    environment = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)",
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "comfyui": comfyui_version.__version__,
        "attention": comfy.ldm.modules.attention.optimized_attention.__name__,
        "torch_device": str(comfy.model_management.get_torch_device()), "skipped_variants": skipped,
        "tf32": "off (the float32 reference is float32)" if cuda else None,
    }
    results = []

    def write():
        output.write_text(json.dumps({"environment": environment, "cells": results}, indent=1))

    for architecture in cells["architectures"]:
        for path in cells["paths"]:
            for variant in cells["variants"]:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                cell = {"architecture": architecture, "path": path, "variant": variant,
                        "tolerance": matrix.tolerance(path, variant)}
                try:
                    errors = matrix.run_cell(architecture, path, variant)
                    cell["errors"] = {name: (None if error != error else error) for name, error in errors.items()}
                    cell["passed"] = all(error == error and error <= cell["tolerance"] for error in errors.values())
                except Exception as error:  # a crash is a finding: keep going, report it
                    cell["passed"], cell["exception"] = False, f"{type(error).__name__}: {error}"
                cell["seconds"] = round(time.perf_counter() - started, 2)
                cell["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
                results.append(cell)
                print(f"matrix {architecture} {path} {variant}: {cell.get('errors', cell.get('exception'))}", flush=True)
                write()
    write()


def bench_child(script: str, arguments: list[str]) -> None:
    """Run a bench script as __main__ in this process, then print its peak memory (GPU and process)."""
    import resource
    import runpy

    sys.argv = [script, *arguments]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        torch = sys.modules.get("torch")
        gpu = torch.cuda.max_memory_allocated() if torch is not None and torch.cuda.is_initialized() else None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(PEAK_MARK + json.dumps({"peak_gpu_bytes": gpu, "peak_rss_bytes": rss}), flush=True)


def help_child(scripts: list[str]) -> None:
    """The dry run's bench check, in one process (ComfyUI imported once): each script's --help, which must
    exit 0 and list --gpu; one line per script."""
    import contextlib
    import io
    import runpy

    for script in scripts:
        text, started = io.StringIO(), time.perf_counter()
        sys.argv = [script, "--help"]
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                runpy.run_path(script, run_name="__main__")
            status = "did not stop at --help"
        except SystemExit as stop:
            status = stop.code or 0
        except Exception as error:
            status = f"{type(error).__name__}: {error}"
        if status == 0 and "--gpu" not in text.getvalue():
            status = "no --gpu option"
        print(HELP_MARK + json.dumps({"script": script, "status": status, "seconds": time.perf_counter() - started,
                                      "output": text.getvalue()[-3000:]}), flush=True)


# ---- the check: children under a deadline, then one report ----

def run_child(arguments: list[str], timeout: float) -> tuple[int | None, str, float]:
    """(exit status or None when out of time, its output, seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *arguments], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        output, _ = process.communicate(timeout=max(timeout, 1))
        status = process.returncode
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        status = None
    return status, output, time.perf_counter() - started


def parse_bench(output: str) -> dict:
    """The ratio tables a bench printed (bench/run.py's print_table rows, fit_lora's ratio lines) and its peak."""
    tables, title, peak = [], None, {}
    for line in output.splitlines():
        row, ratio_row = TABLE_ROW.match(line), RATIO_ROW.match(line)
        if line.startswith(PEAK_MARK):
            peak = json.loads(line[len(PEAK_MARK):])
        elif row or ratio_row:
            if not tables or tables[-1]["title"] != title:
                tables.append({"title": title, "rows": []})
            found = (row or ratio_row).groupdict()
            tables[-1]["rows"].append({"label": found["label"], "ratio": float(found["ratio"]),
                                       "seconds": float(found["seconds"]) if "seconds" in found else None,
                                       "baseline": found.get("baseline")})
        elif line.strip() and not line.startswith(" ") and not line.startswith(("WARNING", "Traceback")):
            title = line.strip()
    return {"tables": tables, **peak}


def bench_arguments(script: Path, repeats: int) -> list[str]:
    takes_repeats = "bench_main(" in script.read_text() or "--repeats" in script.read_text()
    return ["--gpu", *(["--repeats", str(repeats)] if takes_repeats else [])]


def megabytes(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def markdown(report: dict) -> str:
    environment = report["environment"]
    lines = ["# GPU check", "", f"{'dry run (CPU, tiny sizes)' if report['dry_run'] else 'full run'}, "
             f"{report['seconds']:.0f} s", "", "## Environment", ""]
    lines += [f"- {key}: {value}" for key, value in environment.items()]
    lines += ["", "## Precision matrix", "",
              "Relative error of each node's output against float32 on the same device (tolerance in brackets).", "",
              "| architecture | node path | variant | errors | passed | seconds | peak GPU |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for cell in report["matrix"]:
        errors = cell.get("exception") or ", ".join(
            f"{name} {'NaN' if error is None else f'{error:.1e}'}" for name, error in cell["errors"].items())
        lines.append(f"| {cell['architecture']} | {cell['path']} | {cell['variant']} | {errors} ({cell['tolerance']:.1e}) "
                     f"| {'yes' if cell['passed'] else '**NO**'} | {cell['seconds']} | {megabytes(cell['peak_gpu_bytes'])} |")
    if report.get("matrix_problem"):
        lines += ["", f"**matrix:** {report['matrix_problem']}"]
    lines += ["", "## Benchmarks", ""]
    for bench in report["benches"]:
        lines += [f"### {bench['script']} {' '.join(bench['arguments'])}", "",
                  f"status: {bench['status']}, {bench['seconds']:.0f} s, peak GPU {megabytes(bench.get('peak_gpu_bytes'))}, "
                  f"peak process memory {megabytes(bench.get('peak_rss_bytes'))}", ""]
        if bench["arguments"] == ["--help"]:
            lines += ["dry run: its command line only (`--help` exits 0 and lists --gpu)", ""]
        for table in bench["tables"]:
            lines += [f"{table['title']}", "", "| configuration | seconds | ratio |", "| --- | --- | --- |"]
            lines += [f"| {row['label']} | {row['seconds'] if row['seconds'] is not None else '-'} | "
                      f"{row['ratio']:.2f}x {row['baseline'] or ''} |" for row in table["rows"]]
            lines.append("")
        if bench["status"] != "ok":
            lines += ["```", bench["output_tail"], "```", ""]
    return "\n".join(lines) + "\n"


def check(out: Path, dry_run: bool, repeats: int, skip_matrix: bool, skip_benches: bool, deadline: float) -> int:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    report = {"dry_run": dry_run, "environment": {}, "matrix": [], "benches": []}
    cells_file = out / "matrix_cells.json"
    if not skip_matrix:
        print("=== precision matrix", flush=True)
        cells_file.unlink(missing_ok=True)
        status, output, _ = run_child(["--matrix-child", str(cells_file), *(["--dry-run"] if dry_run else [])],
                                      deadline * (0.5 if skip_benches else 0.4))
        print(output[-3000:], flush=True)
        if cells_file.is_file():
            cells = json.loads(cells_file.read_text())
            report["environment"], report["matrix"] = cells["environment"], cells["cells"]
            cells_file.unlink()
        if status != 0:
            report["matrix_problem"] = ("ran out of time" if status is None else f"exit status {status}") + \
                ": " + output[-2000:]
    scripts = [] if skip_benches else BENCHES
    if dry_run and scripts:  # each bench's command line only (its sizes are a GPU's): one process for all
        print("=== bench/*.py --help", flush=True)
        status, output, _ = run_child(["--help-child", *map(str, scripts)], deadline - (time.perf_counter() - started))
        checked = {line["script"]: line for line in
                   (json.loads(l[len(HELP_MARK):]) for l in output.splitlines() if l.startswith(HELP_MARK))}
        for script in scripts:
            line = checked.get(str(script), {"status": "not reached" if status is None else f"child failed ({status})",
                                             "seconds": 0.0, "output": output[-3000:]})
            report["benches"].append({"script": str(script.relative_to(REPO)), "arguments": ["--help"],
                                      "seconds": line["seconds"], "tables": [],
                                      "status": "ok" if line["status"] == 0 else str(line["status"]),
                                      "output_tail": line["output"]})
            print(f"    {script.relative_to(REPO)}: {report['benches'][-1]['status']}", flush=True)
        scripts = []
    for index, script in enumerate(scripts):
        left = deadline - (time.perf_counter() - started)
        share = left / (len(scripts) - index)
        arguments = bench_arguments(script, repeats)
        print(f"=== {script.relative_to(REPO)} {' '.join(arguments)} (at most {share:.0f} s)", flush=True)
        status, output, seconds = run_child(["--bench-child", str(script), *arguments], share)
        bench = {"script": str(script.relative_to(REPO)), "arguments": arguments, "seconds": seconds,
                 "status": "ok" if status == 0 else ("out of time" if status is None else f"failed ({status})"),
                 **parse_bench(output), "output_tail": output[-3000:]}
        print(f"    {bench['status']} in {seconds:.0f} s, {sum(len(t['rows']) for t in bench['tables'])} ratios", flush=True)
        report["benches"].append(bench)
    report["seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    failed = [f"{c['architecture']} {c['path']} {c['variant']}" for c in report["matrix"] if not c["passed"]]
    failed += [b["script"] for b in report["benches"] if b["status"] != "ok"]
    failed += ["matrix"] if report.get("matrix_problem") else []
    print(f"report: {out / 'report.md'} ({report['seconds']:.0f} s)" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
          flush=True)
    return 1 if failed else 0


def main() -> None:
    if sys.argv[1:2] == ["--matrix-child"]:
        return matrix_child(Path(sys.argv[2]), "--dry-run" in sys.argv[3:])
    if sys.argv[1:2] == ["--help-child"]:
        return help_child(sys.argv[2:])
    if sys.argv[1:2] == ["--bench-child"]:
        return bench_child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_report"), help="the report's folder (default ./gpu_report)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script in about a minute")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per bench configuration (after a warm-up)")
    parser.add_argument("--skip-matrix", action="store_true")
    parser.add_argument("--skip-benches", action="store_true")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole check")
    options = parser.parse_args()
    if not options.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); --dry-run checks the "
                     "script on the CPU")
    sys.exit(check(options.out.resolve(), options.dry_run, options.repeats, options.skip_matrix, options.skip_benches,
                   options.deadline))


if __name__ == "__main__":
    main()
