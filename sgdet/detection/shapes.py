"""A generated COCO-format detection dataset of coloured shapes: real PNG files and a COCO json
that every loader, the trainer and pycocotools read exactly as they read COCO. The tests and
``make detection-demo`` use it, since no detection dataset can be downloaded here."""
from __future__ import annotations

import os

import torch
from sgdet.files import write_json

CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "disc"}, {"id": 3, "name": "triangle"}]


def _draw(draw, category: int, box: list[int], colour: tuple) -> None:
    x0, y0, x1, y1 = box
    if category == 1:
        draw.rectangle(box, fill=colour)
    elif category == 2:
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def make_shapes_dataset(folder: str | os.PathLike, n_images: int = 64, size: int = 128,
                        max_objects: int = 3, min_side: int = 16, max_side: int = 56,
                        seed: int = 0, categories: list[dict] | None = None,
                        json_name: str = "instances.json") -> tuple[str, str]:
    """Write ``n_images`` PNGs of ``size`` px (1..``max_objects`` non-overlapping shapes each,
    on a noisy dark background) under ``folder/images`` and their COCO json; returns
    (json_file, image_root). Deterministic for a ``seed``. The json is written atomically."""
    from PIL import Image, ImageDraw
    categories = categories or CATEGORIES
    gen = torch.Generator().manual_seed(seed)
    folder = os.fspath(folder)
    images_dir = os.path.join(folder, "images")
    os.makedirs(images_dir, exist_ok=True)
    images, annotations = [], []

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=gen))

    for i in range(n_images):
        noise = (torch.rand(size, size, 3, generator=gen) * 40).to(torch.uint8)
        image = Image.fromarray(noise.numpy(), "RGB")
        draw = ImageDraw.Draw(image)
        placed: list[list[int]] = []
        for _ in range(randint(1, max_objects + 1)):
            for _attempt in range(20):          # a spot that overlaps nothing placed yet
                w, h = randint(min_side, max_side + 1), randint(min_side, max_side + 1)
                x, y = randint(0, size - w), randint(0, size - h)
                box = [x, y, x + w, y + h]
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                    break
            else:
                continue
            placed.append(box)
            category = categories[randint(0, len(categories))]["id"]
            colour = tuple(randint(90, 256) for _ in range(3))
            _draw(draw, (category - 1) % 3 + 1, box, colour)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        name = f"{i:05d}.png"
        image.save(os.path.join(images_dir, name))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    json_file = os.path.join(folder, json_name)
    write_json(json_file, {"images": images, "annotations": annotations, "categories": categories},
               indent=None)
    return json_file, images_dir
