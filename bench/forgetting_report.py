"""Presents a ``bench/forgetting.py`` result: the PNG plot and the markdown table.

Kept apart from the measuring so that a result JSON can be re-plotted without re-training:
``python bench/forgetting_report.py bench/results/forgetting-tiny-cpu.json``.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqlora_core.app.plot import heatmap_image  # noqa: E402



def markers(section: str = "forgetting") -> tuple[str, str]:
    """The comments around a table in RESULTS.md; one pair per ``--section`` (e.g. one per base)."""
    return f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
COLOURS = {"seqlora": (200, 30, 30), "alternating": (230, 140, 20), "frozen-basis": (30, 130, 60),
           "lora": (40, 80, 200), "independent": (120, 60, 160)}


def forgetting_curve(run: dict) -> list[float]:
    """After concept k: mean loss increase of the concepts learned before it (0 for the first)."""
    losses = run["losses"]
    return [statistics.fmean(losses[k][i] - losses[i][i] for i in range(k)) if k else 0.0 for k in range(len(losses))]


def mean_curves(runs: list[dict], preset: str) -> dict[str, list[float]]:
    """method → forgetting curve averaged over seeds."""
    by_method: dict[str, list[list[float]]] = {}
    for run in runs:
        if run["preset"] == preset:
            by_method.setdefault(run["method"], []).append(forgetting_curve(run))
    return {m: [statistics.fmean(v) for v in zip(*curves)] for m, curves in by_method.items()}


def curves_image(curves: dict[str, list[float]], title: str, width: int = 420, height: int = 260) -> Image.Image:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 110, 22, height - 30
    draw.text((4, 4), title, fill=(0, 0, 0))
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    values = [v for c in curves.values() for v in c]
    lo, hi = min(values + [0.0]), max(values + [0.0])
    span = (hi - lo) or 1.0
    n = max(len(c) for c in curves.values())

    def point(k, v):
        return left + (right - left) * k / max(n - 1, 1), bottom - (bottom - top) * (v - lo) / span

    zero = point(0, 0.0)[1]
    draw.line((left, zero, right, zero), fill=(210, 210, 210))
    for row, (method, curve) in enumerate(curves.items()):
        colour = COLOURS.get(method, (0, 0, 0))
        pts = [point(k, v) for k, v in enumerate(curve)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((right + 8, top + 14 * row), method, fill=colour)
    draw.text((4, top - 2), f"{hi:+.4f}", fill=(0, 0, 0))
    draw.text((4, bottom - 10), f"{lo:+.4f}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), f"concepts learned (1..{n}); y: mean loss increase of earlier ones", fill=(0, 0, 0))
    return img


def write_plot(result: dict, path: Path) -> None:
    """One row per preset: forgetting curves, then each method's final forgetting matrix (first
    seed) as a heat map, all maps on one colour scale."""
    runs = result["runs"]
    presets = result["settings"]["presets"]
    methods = result["settings"]["methods"]
    seed = result["settings"]["seeds"][0]
    first = {(r["preset"], r["method"]): r for r in runs if r["seed"] == seed}
    methods = [m for m in methods if any((p, m) in first for p in presets)]
    top = max([v for r in first.values() for row in r["forgetting"] for v in row if v is not None and v > 0],
              default=1e-6)
    rows = []
    for preset in presets:
        tiles = [curves_image(mean_curves(runs, preset), f"forgetting curves, targets '{preset}'")]
        for method in methods:
            run = first.get((preset, method))
            if run is None:
                continue
            labels = [t.strip("<>") for t in run["concepts"]]
            tiles.append(Image.fromarray(heatmap_image(run["forgetting"], labels, f"{method} ({preset})", top=top)))
        height = max(t.height for t in tiles)
        row = Image.new("RGB", (sum(t.width for t in tiles) + 8 * len(tiles), height), (255, 255, 255))
        x = 0
        for tile in tiles:
            row.paste(tile, (x, 0))
            x += tile.width + 8
        rows.append(row)
    note = result.get("note", "")
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 24), (255, 255, 255))
    ImageDraw.Draw(canvas).text((4, 4), f"{result['settings']['base']}: {note}", fill=(120, 0, 0))
    y = 24
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _cell(stat: dict, fmt: str) -> str:
    text = format(stat["mean"], fmt)
    return text + (f" ± {format(stat['std'], fmt.lstrip('+'))}" if stat["n"] > 1 else "")


def markdown(result: dict, json_name: str, section: str = "forgetting") -> str:
    s = result["settings"]
    m = result["machine"]
    seeds = ",".join(str(x) for x in s["seeds"])
    command = (f"python bench/forgetting.py --base {s['base']} --device {m['device'].split(':')[0]} "
               f"--concepts {len(s['concepts'])} --steps {s['steps']} --bilevel-iters {s['bilevel_iters']} --seeds {seeds}"
               + (f" --threads {s['threads']}" if s.get("threads") == 1 else ""))
    # the choices that differ from the script's defaults (methods, presets, resolution)
    if s["methods"] != list(COLOURS):
        command += f" --methods {','.join(s['methods'])}"
    if s["presets"] != ["default", "unet-cross"]:
        command += f" --presets {','.join(s['presets'])}"
    if s["resolution"] != (64 if s["base"] in ("tiny", "toy") else 512):
        command += f" --resolution {s['resolution']}"
    merged = result.get("merged_from")
    how = ""
    if merged:  # one run per seed, merged (bench/forgetting.py --merge)
        every = result["settings"]["presets"]  # a run merged before splits were possible had them all
        split = any(m.get("presets", every) != every for m in merged)

        def part(m: dict) -> str:
            presets = m.get("presets", every)
            only = f" (presets {','.join(presets)})" if presets != every else ""
            return (f"seeds {','.join(map(str, m['seeds']))}{only}: {m['seconds_total'] / 60:.0f} min at load "
                    f"{m['load_average_at_end'][1]:.1f}")

        how = (f"; run here as {len(merged)} runs (" + "; ".join(part(m) for m in merged)
               + "), each with `--seeds S " + ("[--presets P] " if split else "")
               + "--out DIR_S --results-md ''`, then merged with `python bench/forgetting.py "
                 f"--merge DIR_*/{json_name}` (the same table: seeds only change the training)")
    begin, end = markers(section)
    title = "## Forgetting, crosstalk and composition (`bench/forgetting.py`)"
    if section != "forgetting":
        title = f"### Forgetting, crosstalk and composition on `{s['base']}` (`bench/forgetting.py --section {section}`)"
        command += f" --section {section}"
    lines = [begin, title, "",
             f"**{result['note']}**", "",
             f"{m['device_name']} ({m['cores']} cores, {s.get('threads', '?')} torch thread(s), torch {m['torch']}, fp32, {result['date'][:10]}, load average "
             f"{m['load_average_at_end'][1]:.1f} over the last 5 min at the end); base `{s['base']}`, "
             f"{s['resolution']} px, {len(s['concepts'])} concepts ({', '.join(s['concepts'])}), {s['steps']} minibatches "
             f"× K = {s['bilevel_iters']} per concept, T = {s['inner_steps']}, rank {s['rank']}, "
             f"lr {s['lr_a']:g}/{s['lr_b']:g}/{s['lr_embedding']:g}; seeds {seeds} (± = spread over seeds); "
             f"{result['seconds_total'] / 60:.0f} min in all.", "",
             "| targets | method | mean forgetting | worst forgetting | composition loss | crosstalk: other concepts' prompts | "
             "crosstalk, absolute | ‖ΔW‖ per concept | largest ΔW entry | "
             "crosstalk: prompt without the token | composition drift | interference (stored statistics) | s / concept | "
             "peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset, methods in result["summary"].items():
        for method, v in methods.items():
            lines.append(f"| {preset} | {method} | {_cell(v['mean_forgetting'], '+.5f')} | "
                         f"{_cell(v['worst_forgetting'], '+.5f')} | {_cell(v['composition_loss'], '.5f')} | "
                         f"{_cell(v['crosstalk_other_prompts'], '.3f')} | "
                         + " | ".join(_cell(v[k], f) if k in v else "-" for k, f in
                                      (("crosstalk_other_prompts_abs", ".4f"), ("residual_norm", ".3g"),
                                       ("residual_max_entry", ".3g")))
                         + f" | {_cell(v['crosstalk_neutral_prompt'], '.3f')} | "
                         f"{_cell(v['composition_drift'], '.3f')} | "
                         f"{_cell(v['interference_mean'], '.4f') if 'interference_mean' in v else '-'} | "
                         f"{_cell(v['seconds_per_concept'], '.1f')} | "
                         f"{_cell(v['peak_memory_mb'], '.0f')} |")
    for f in result.get("failed", []):
        lines.append(f"| {f['preset']} | {f['method']} (seed {f['seed']}) | failed: {f['error']} | | | | | | | | | | | |")
    lines += quality_table(result)
    lines += ["", "Forgetting: a concept's denoising loss (fixed images, noise and timesteps) after the whole stream "
              "minus right after its own training, over every concept but the last. Composition loss: mean loss of "
              "every concept with all applied. Crosstalk: how far one concept alone moves the noise prediction of "
              "another concept's prompt, or of the prompt \"a photo of a <init word>\", relative to how far it moves "
              "its own prompt (token embeddings registered in every case: the residuals' effect); crosstalk, "
              "absolute: the same move on other concepts' prompts as an RMS per element of the prediction (the noise "
              "has RMS 1); ‖ΔW‖: √Σ‖A·Bᵀ‖²_F over a concept's layers, mean over concepts; largest ΔW entry: over "
              "every concept and layer (fp16 ends at 65504); composition drift: "
              "all the others together on a concept's prompt, same scale. 0 = no bleeding. Interference: mean "
              "off-diagonal entry of `bank interference` on the final bank (energy of one concept's residual on "
              "another's layer inputs relative to the latter's own, from the stored activation statistics).", "",
              f"Reproduce: `{command}`{how} (JSON: `bench/results/{json_name}`, plot beside it).", "",
              f"![forgetting curves and matrices](results/{Path(json_name).with_suffix('.png').name})", end]
    return "\n".join(lines)


QUALITY = (("identification_own", "identified right after its training", ".1%"),
           ("identification_all", "identified after the whole stream", ".1%"),
           ("identification_forgetting", "identification lost", "+.1%"),
           ("own_loss_over_base", "own loss ÷ base's", ".3f"),
           ("bleed_captions_followed", "base captions followed, all loaded", ".1%"),
           ("bleed_pixel_change", "their pixels' change (0-255)", ".2f"),
           ("bleed_eps_change", "their ε change (RMS)", ".4f"),
           ("regional_own", "two in two regions: each in its own", ".1%"),
           ("regional_both", "both regions right", ".1%"))


def _pct(stat: dict, fmt: str) -> str:
    if "%" not in fmt:
        return _cell(stat, fmt)
    scaled = {**stat, "mean": stat["mean"] * 100, "std": stat["std"] * 100}
    return _cell(scaled, fmt.replace("%", "f")) + " %"


def quality_table(result: dict) -> list[str]:
    """The table on generated pictures (a base that has learned: ``toy``), when the runs have it."""
    rows = [(p, m, v) for p, methods in result["summary"].items() for m, v in methods.items() if QUALITY[0][0] in v]
    if not rows:
        return []
    base = result["runs"][0].get("bleed", {}).get("captions_followed_base")
    lines = ["", "On generated pictures: \"a photo of <token>\" identified as the concept's own photo among the "
             f"stream's {len(result['settings']['concepts'])} (nearest colour histogram; chance "
             f"{1 / len(result['settings']['concepts']):.1%}), {result['settings'].get('identify_seeds', 2)} "
             "seeds per concept, every concept so far loaded; own loss ÷ base's: the concept's ε-loss on its photos "
             "over the base's for \"a photo of a <init word>\"; bleed on the base's 9 held-out captions (the "
             f"base alone follows {base:.1%} of them); regions: concepts 1+2, 3+4, … side by side, each half's crop "
             "identified among all concepts.", "",
             "| targets | method | " + " | ".join(label for _, label, _ in QUALITY) + " |",
             "|---|---|" + "---|" * len(QUALITY)]
    for preset, method, v in rows:
        lines.append(f"| {preset} | {method} | " + " | ".join(_pct(v[k], f) if k in v else "-" for k, _, f in QUALITY) + " |")
    return lines


def update_results_md(result: dict, path: Path, json_name: str, section: str = "forgetting") -> None:
    """Replace the table between the section's markers (append it when there is none)."""
    _replace_marked(path, section, markdown(result, json_name, section))


def replace_section(path: Path, section: str, body: str) -> None:
    """Put ``body`` between the section's markers in ``path`` (appended when there are none)."""
    begin, end = markers(section)
    _replace_marked(path, section, f"{begin}\n{body}\n{end}")


def _replace_marked(path: Path, section: str, table: str) -> None:
    """``table`` (its markers included) in place of the marked section, or appended."""
    text = path.read_text() if path.exists() else ""
    begin, end = markers(section)
    if begin in text and end in text:
        text = text[:text.index(begin)] + table + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + table + "\n"
    path.write_text(text)


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    write_plot(data, Path(sys.argv[1]).with_suffix(".png"))
    print(f"wrote {Path(sys.argv[1]).with_suffix('.png')}")
