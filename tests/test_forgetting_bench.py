"""bench/forgetting.py end to end at CI size: every method and preset, the JSON, the plot, the table."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["seqlora", "alternating", "frozen-basis", "lora", "independent"]


def test_forgetting_benchmark_two_concepts_two_steps(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nkept text\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SEQLORA_CACHE=str(ROOT / ".cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "forgetting.py"), "--base", "tiny", "--concepts", "2",
                           "--steps", "2", "--threads", "1", "--out", str(tmp_path), "--results-md", str(results_md)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random weights" in proc.stdout  # honesty about the base, in the output itself
    data = json.loads((tmp_path / "forgetting-tiny-cpu.json").read_text())
    assert data["failed"] == [] and data["settings"]["random_weights"] is True
    assert set(data["summary"]) == {"default", "unet-cross"}
    assert all(set(methods) == set(METHODS) for methods in data["summary"].values())
    assert len(data["runs"]) == 10
    for run in data["runs"]:
        losses, forgetting = run["losses"], run["forgetting"]
        assert [len(row) for row in losses] == [1, 2]
        assert forgetting[0][0] is None and forgetting[1] == [None, None]
        assert forgetting[0][1] == losses[1][0] - losses[0][0]
        assert run["mean_forgetting"] == forgetting[0][1]
        assert run["composition_loss"] == sum(losses[1]) / 2
        cross = run["crosstalk"]
        assert cross["matrix"][0][0] is None and cross["matrix"][0][1] >= 0 and cross["neutral"][0] >= 0
        assert run["interference"]["missing_stats"] == [] and run["interference"]["matrix"][1][0] >= 0
        assert run["interference_mean"] is not None and run["interference_mean"] >= 0
        assert run["seconds_per_concept"] > 0 and run["peak_memory_mb"] >= 0
        if run["method"] in ("seqlora", "alternating", "frozen-basis"):
            assert run["max_orthogonality_error"] < 1e-4
        else:  # unconstrained bases overlap: the comparison is not between identical models
            assert run["max_orthogonality_error"] > 1e-3
    assert (tmp_path / "forgetting-tiny-cpu.png").read_bytes()[:4] == b"\x89PNG"
    text = results_md.read_text()
    assert "kept text" in text and "<!-- forgetting:begin -->" in text and "random weights" in text
    assert text.count("| unet-cross |") == 5 and "--concepts 2 --steps 2" in text

    # runs of other seeds (same settings) merge into one table with the spread over all of them
    other = json.loads(json.dumps(data))
    other["settings"]["seeds"] = [7]
    for run in other["runs"]:
        run["seed"] = 7
        run["mean_forgetting"] += 1.0
    second = tmp_path / "seed7.json"
    second.write_text(json.dumps(other))
    first = tmp_path / "forgetting-tiny-cpu.json"

    def merge(*files, out="merged", extra=()):
        return subprocess.run([sys.executable, str(ROOT / "bench" / "forgetting.py"), "--merge", *map(str, files),
                               "--out", str(tmp_path / out), "--results-md", str(results_md), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    proc = merge(first, second)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "merged" / "forgetting-tiny-cpu.json").read_text())
    assert merged["settings"]["seeds"] == [0, 7] and len(merged["runs"]) == 20
    cell = merged["summary"]["default"]["seqlora"]["mean_forgetting"]
    own = data["summary"]["default"]["seqlora"]["mean_forgetting"]["mean"]
    assert cell["n"] == 2 and abs(cell["mean"] - (own + 0.5)) < 1e-9 and abs(cell["std"] - 2 ** -0.5) < 1e-9
    assert "--seeds 0,7" in results_md.read_text() and "--merge" in results_md.read_text()
    # a second table (another base, say) in its own section, the first one kept
    assert merge(first, second, out="other", extra=("--section", "forgetting-other")).returncode == 0
    text = results_md.read_text()
    assert text.count("<!-- forgetting:begin -->") == 1 and text.count("<!-- forgetting-other:begin -->") == 1
    assert text.count("| unet-cross |") == 10 and "kept text" in text
    again = merge(first, first, out="twice")
    assert again.returncode != 0 and "seed 0 is in both" in again.stderr
    other["settings"]["steps"] = 3
    second.write_text(json.dumps(other))
    differ = merge(first, second, out="differ")
    assert differ.returncode != 0 and "settings differ" in differ.stderr and "steps" in differ.stderr

    # one seed split over two processes by preset merges back into the same table
    halves = []
    for preset in ("default", "unet-cross"):
        half = json.loads(json.dumps(data))
        half["settings"]["presets"] = [preset]
        half["runs"] = [run for run in half["runs"] if run["preset"] == preset]
        halves.append(tmp_path / f"half-{preset}.json")
        halves[-1].write_text(json.dumps(half))
    assert merge(*halves, out="halves").returncode == 0
    rejoined = json.loads((tmp_path / "halves" / "forgetting-tiny-cpu.json").read_text())
    assert rejoined["settings"]["presets"] == ["default", "unet-cross"] and rejoined["summary"] == data["summary"]
    assert "seeds 0 (presets default)" in results_md.read_text() and "[--presets P]" in results_md.read_text()
    lonely = merge(first, halves[0], out="lonely")  # seed 0's default preset twice
    assert lonely.returncode != 0 and "seed 0 is in both" in lonely.stderr


def test_forgetting_benchmark_on_toy_measures_generated_pictures(tmp_path):
    """On the toy base the runs also identify concepts, measure bleed and two regions."""
    results_md = tmp_path / "RESULTS.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SEQLORA_CACHE=str(ROOT / ".cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "forgetting.py"), "--base", "toy", "--concepts", "2",
                           "--steps", "2", "--methods", "seqlora,independent", "--presets", "unet-cross",
                           "--threads", "1", "--out", str(tmp_path), "--results-md", str(results_md)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "forgetting-toy-cpu.json").read_text())
    assert data["settings"]["random_weights"] is False and "toy world" in data["note"]
    for run in data["runs"]:
        assert len(run["identified_own"]) == len(run["identified_all"]) == 2
        assert all(0 <= v <= 1 for v in run["identified_own"] + run["identified_all"])
        assert run["bleed"]["n"] == 9 and 0 <= run["bleed_captions_followed"] <= 1
        assert run["bleed"]["captions_followed_base"] >= 0.8  # two 2-minibatch concepts: the base still draws
        assert run["regional"]["pictures"] == 1 and run["own_loss_over_base"] > 0
    text = results_md.read_text()
    assert "identified right after its training" in text and text.count("| unet-cross |") == 4
