"""PNG grids of real against generated images, one row per perturbation (the control first when given).

Row r: the perturbation's name, then k real images, a gap, then k generated images (6-channel images projected to
RGB with `project_to_rgb`, the mapping `channel_legend` describes). Small crops are enlarged with
nearest-neighbour upsampling so they stay visible.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from phenoflow.eval.project import DEFAULT_WEIGHTS, to_uint8_rgb


def save_png(path: Path, save: Callable[[Path], object]) -> Path:
    """Write a PNG atomically: `save(tmp)` (PIL's Image.save, matplotlib's savefig) to <stem>.tmp.png, then
    rename over `path` (run_folder.py removes stale temporaries)."""
    tmp = path.with_name(path.stem + ".tmp.png")
    save(tmp)
    tmp.replace(path)
    return path

PAD = 2  # pixels between tiles
GAP = 12  # extra pixels between the real and the generated block
CONTROL_ROW = "control"  # name of the grids' control row


def save_grid(rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, k: int = 4,
              weights: Sequence[Sequence[float]] | None = None, min_tile: int = 64, title: str = "") -> Path:
    """Write a grid PNG. rows: name -> (real (n, C, H, W), generated (m, C, H, W)) uint8 or [-1, 1] float.

    Each row shows up to k real then up to k generated images (blank tiles where fewer exist).
    """
    if not rows:
        raise ValueError("save_grid: no rows to draw")
    first_real = next(iter(rows.values()))[0]
    h, w = first_real.shape[-2:]
    scale = max(1, -(-min_tile // max(h, w)))  # ceil(min_tile / size)
    th, tw = h * scale, w * scale
    font = ImageFont.load_default()
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in rows)
    header = 20 + (14 if title else 0)
    width = label_w + 2 * k * (tw + PAD) + GAP
    height = header + len(rows) * (th + PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y0 = 2
    if title:
        draw.text((4, y0), title, fill=(0, 0, 0), font=font)
        y0 += 14
    draw.text((label_w, y0), "real", fill=(0, 0, 0), font=font)
    draw.text((label_w + k * (tw + PAD) + GAP, y0), "generated", fill=(0, 0, 0), font=font)
    for r, (name, (real, gen)) in enumerate(rows.items()):
        y = header + r * (th + PAD)
        draw.text((4, y + th // 2 - 5), name, fill=(0, 0, 0), font=font)
        for block, imgs in enumerate((real, gen)):
            if imgs.shape[0] == 0:
                continue
            tiles = to_uint8_rgb(imgs[:k].cpu(), weights).numpy()
            for i, tile in enumerate(tiles):
                im = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
                x = label_w + block * (k * (tw + PAD) + GAP) + i * (tw + PAD)
                canvas.paste(im, (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(path, canvas.save)


def grid_rows(real: torch.Tensor, real_labels: torch.Tensor, gen: torch.Tensor, gen_labels: torch.Tensor,
              names: Sequence[str], k: int = 4, max_rows: int = 16,
              control: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group images by perturbation index into save_grid rows (first k of each; at most max_rows perturbations).

    control: (real, generated) control images: the first row, named CONTROL_ROW (replacing a row of that name)."""
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if control is not None:
        rows[CONTROL_ROW] = (control[0][:k], control[1][:k])
    for p in torch.unique(real_labels).tolist()[:max_rows]:
        name = names[p] if p < len(names) else str(p)
        if name in rows:
            continue
        rows[name] = (real[real_labels == p][:k], gen[gen_labels == p][:k])
    return rows


def channel_legend(channels: int, names: Sequence[str] = (),
                   weights: Sequence[Sequence[float]] | None = None) -> list[dict[str, object]]:
    """How each image channel is drawn in the grids: [{channel, name, rgb (0-1 triple), hex}], one per channel.

    6 channels: project_to_rgb's DEFAULT_WEIGHTS (the CellFlux projection; rgb = clamp(sum_c x_c w_c, -1, 1) on
    [-1, 1] data, then mapped to [0, 1]); 3 channels: shown as they are, channel 0 red, 1 green, 2 blue."""
    if weights is None:
        if channels == 6:
            weights = DEFAULT_WEIGHTS
        elif channels == 3:
            weights = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
        else:
            return []
    out = []
    for c, w in enumerate(weights):
        rgb = tuple(float(x) for x in w)
        out.append({"channel": c, "name": names[c] if c < len(names) else "",
                    "rgb": rgb, "hex": "#" + "".join(f"{round(255 * x):02x}" for x in rgb)})
    return out


def save_legend(legend: Sequence[dict], path: str | Path) -> Path:
    """A small PNG of the channel legend: one colour swatch and its channel name per line."""
    font = ImageFont.load_default()
    lines = [f"ch{e['channel']} {e['name']}".strip() for e in legend]
    tw = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in lines)
    canvas = Image.new("RGB", (30 + tw + 8, 4 + 16 * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (e, t) in enumerate(zip(legend, lines)):
        y = 4 + 16 * i
        draw.rectangle((4, y, 20, y + 12), fill=tuple(round(255 * x) for x in e["rgb"]), outline=(0, 0, 0))
        draw.text((26, y), t, fill=(0, 0, 0), font=font)
    return save_png(Path(path), canvas.save)
