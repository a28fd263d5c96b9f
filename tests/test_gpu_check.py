"""scripts/gpu_check.py: its dry run on the CPU writes the one report with every section, and its parser
reads the benches' ratio tables."""

import json
import os
import subprocess
import sys

import pytest

import gpu_check  # scripts/ (no ComfyUI import at module level)

pytestmark = pytest.mark.one_host

_HOST, _MATRIX_HOST = os.environ.get("STYLE_ATTENTION_HOST"), os.environ.get("STYLE_ATTENTION_END_TO_END_HOST")
on_matrix_host = pytest.mark.skipif(_MATRIX_HOST is not None and _MATRIX_HOST != _HOST,
                                    reason=f"gpu_check's dry run: make test runs it on ComfyUI {_MATRIX_HOST} only")


@on_matrix_host
def test_the_dry_run_writes_one_report_with_the_matrix_and_every_bench(tmp_path):
    out = tmp_path / "report"
    finished = subprocess.run([sys.executable, str(gpu_check.REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out",
                               str(out)], cwd=gpu_check.REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] is True
    assert report["environment"]["device"].startswith("CPU") and report["environment"]["attention"]
    cells = {(c["architecture"], c["path"], c["variant"]) for c in report["matrix"]}
    expected = gpu_check.DRY_RUN_CELLS
    assert len(cells) == len(expected["architectures"]) * len(expected["paths"]) * len(expected["variants"])
    for cell in report["matrix"]:
        assert cell["passed"] and all(0 <= error <= cell["tolerance"] for error in cell["errors"].values()), cell
    assert [b["script"] for b in report["benches"]] == [f"bench/{p.name}" for p in gpu_check.BENCHES]
    assert len(report["benches"]) >= 7 and all(b["status"] == "ok" and b["arguments"] == ["--help"]
                                               for b in report["benches"]), report["benches"]
    helps = {b["script"]: b["output_tail"] for b in report["benches"]}
    for dit in ("bench/flux.py", "bench/sd3.py", "bench/qwen_image.py", "bench/lumina.py"):  # --gpu, checkable on a CPU
        assert "--dry-run" in helps[dit], helps[dit]
    text = (out / "report.md").read_text()
    for section in ("## Environment", "## Precision matrix", "## Benchmarks", "### bench/run.py --help"):
        assert section in text


def test_the_parser_reads_ratio_tables_fit_lines_and_the_peak():
    output = "\n".join([
        "WARNING: something",
        "sd15 UNet, 512x512, batch 4 with cfg, 20 steps, GPU H100",
        "  plain                                            1.20 s    1.00x plain",
        "  VSP in-batch                                     1.50 s    1.25x plain",
        "FitStyleLoRA, rank 16, GPU H100",
        "  sd15  fit step    0.100 s   sampling step    0.040 s   ratio  2.50 (a forward + backward is about 3.0)",
        gpu_check.PEAK_MARK + json.dumps({"peak_gpu_bytes": 123, "peak_rss_bytes": 456}),
    ])
    parsed = gpu_check.parse_bench(output)
    assert [t["title"] for t in parsed["tables"]] == ["sd15 UNet, 512x512, batch 4 with cfg, 20 steps, GPU H100",
                                                      "FitStyleLoRA, rank 16, GPU H100"]
    assert [(r["label"], r["ratio"]) for r in parsed["tables"][0]["rows"]] == [("plain", 1.0), ("VSP in-batch", 1.25)]
    assert parsed["tables"][1]["rows"][0]["ratio"] == 2.5 and parsed["peak_gpu_bytes"] == 123
