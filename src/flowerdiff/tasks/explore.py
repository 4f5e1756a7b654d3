"""``explore(cfg)``: a local web app (Gradio) to sample from a trained model and edit with it.

Three layers, so that everything but the page itself is testable without a browser:

* :class:`Explorer` is plain Python: it checks every input (a :class:`ValueError` with one
  paragraph naming the control and the fix), runs the shared loops
  (:func:`~flowerdiff.training.generate.sample_batches` and
  :mod:`flowerdiff.training.editing`) and renders the shared figures
  (:mod:`flowerdiff.viz.figures`), so the page shows exactly the pixels ``scripts/sample.py``
  writes for the same seed and settings;
* :func:`build_app` lays out the page: shared controls, one tab per operation; a ValueError
  becomes an error message in the page (``gr.Error``), a note a warning (``gr.Warning``), and
  the queue runs one request at a time while the page stays responsive, with the sampler's
  progress bar shown in the page;
* :func:`explore` checks the command line and loads the model exactly as ``scripts/sample.py``
  does (:func:`~flowerdiff.tasks.sample.load_for_sampling`: untrusted or damaged checkpoints are
  refused with the same message) before anything starts, then serves the page on localhost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from flowerdiff.data.cache import to_rgb
from flowerdiff.diffusion import SAMPLERS, Sampler, SamplerOutput
from flowerdiff.diffusion.editing import check_strength
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.infra.checkpoints import CheckpointError, has_raw_weights
from flowerdiff.infra.config import Problems, check_positive_int, configured_sampler
from flowerdiff.infra.devices import autocast_context
from flowerdiff.infra.exports import is_export, load_model
from flowerdiff.tasks.sample import check_model_path, load_for_sampling
from flowerdiff.training import editing
from flowerdiff.training.generate import resolve_labels, sample_batches
from flowerdiff.training.module import DiffusionModule
from flowerdiff.viz.figures import (
    grid,
    save_gif,
    to_pil,
    to_unit,
    trajectory_figure,
    trajectory_frames,
)

EVERY_CLASS = "every class in turn"
UNCONDITIONAL = "unconditional (null class)"
SEED_MODE = "two seeds"
IMAGE_MODE = "two images (through DDIM inversion)"
WEIGHTS = ("ema", "raw")
MAX_FRAMES = 32
CSS = """
.fd-pixels img { width: 100% !important; height: 100% !important; object-fit: contain;
  image-rendering: pixelated; }
"""


@dataclass
class Result:
    """What a request shows: the images, the trajectory strip and animation, the timings."""

    image: Image.Image
    strip: Image.Image | None
    animation: Path | None
    timings: str
    notes: list[str] = field(default_factory=list)  # shown as warnings


@dataclass(frozen=True)
class Settings:
    """The shared controls, checked: model, sampler, class and guidance."""

    module: DiffusionModule
    sampler: Sampler
    label: int | None  # one class for every image, or None
    every_class: bool  # conditional model, classes in turn (as sample.py's default)
    guidance: Guidance | None
    notes: tuple[str, ...]

    def labels(self, count: int) -> Tensor | None:
        if self.every_class:
            return resolve_labels(self.module, count)
        return None if self.label is None else torch.full((count,), self.label)


# -- inputs -----------------------------------------------------------------------------------
def _integer(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """A whole number from a page control (Gradio sends floats or None for empty fields)."""
    upper = f" and <= {maximum}" if maximum is not None else ""
    message = f"`{name}` must be a whole number >= {minimum}{upper}; got {value!r}."
    if (
        value is None
        or isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
    ):
        raise ValueError(message)
    if value != int(value) or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(message)
    return int(value)


def _number(value: Any, name: str, hint: str) -> float:
    if (
        value is None
        or isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
    ):
        raise ValueError(f"`{name}` must be a number ({hint}); got {value!r}.")
    return float(value)


def _resize_crop(image_shape: tuple[int, int, int]) -> v2.Compose:
    """Training's geometry (:func:`flowerdiff.data.cache.decode_images`): the short side resized
    (bilinear, antialiased), then center-cropped; on [C, H, W] uint8 tensors."""
    _, height, width = image_shape
    return v2.Compose(
        [
            v2.Resize(
                min(height, width), interpolation=v2.InterpolationMode.BILINEAR, antialias=True
            ),
            v2.CenterCrop((height, width)),
        ]
    )


def to_model_image(picture: Image.Image, image_shape: tuple[int, int, int]) -> Tensor:
    """A picture as the model sees images: [1, C, H, W] in [-1, 1], resized and cropped as
    training data is."""
    channels = image_shape[0]
    picture = to_rgb(picture)
    if channels == 1:
        picture = picture.convert("L")
    elif channels != 3:
        raise ValueError(f"This model makes {channels}-channel images; the page handles 1 or 3.")
    tensor = v2.functional.pil_to_tensor(picture)
    return _resize_crop(image_shape)(tensor).float().div(127.5).sub(1.0)[None]


def to_model_mask(
    layers: list[Image.Image], size: tuple[int, int], image_shape: tuple[int, int, int]
) -> Tensor:
    """[1, 1, H, W] of the model's size: 1 where any drawn layer is opaque (the region to
    repaint), with the image's geometry; a stroke covering a sixth of a pixel counts."""
    drawn = np.zeros((size[1], size[0]), dtype=np.uint8)
    for layer in layers:
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        drawn = np.maximum(drawn, np.asarray(alpha))
    mask = _resize_crop(image_shape)(torch.from_numpy(drawn)[None])
    return (mask.float() > 40).float()[None]


def _image(value: Any, what: str) -> Image.Image:
    if value is None:
        raise ValueError(f"{what}: upload an image first (drop a file on the image field).")
    if not isinstance(value, Image.Image):
        raise ValueError(f"{what}: expected an image, got {type(value).__name__}.")
    return value


# -- the explorer -----------------------------------------------------------------------------
class Explorer:
    """A loaded model and the operations of the page, as plain Python.

    Args:
        path: the checkpoint or export (reloaded for the other set of weights).
        module: the model as loaded (``weights``).
        device, autocast: where and how the network runs (as scripts/sample.py).
        raw_available: the checkpoint also holds raw (non-EMA) weights.
    """

    def __init__(
        self,
        path: str | Path,
        module: DiffusionModule,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        weights: str = "ema",
        raw_available: bool = False,
        max_images: int = 16,
        batch_size: int = 16,
        trajectory_images: int = 2,
        trajectory_columns: int = 5,
        work_dir: str | Path | None = None,
        started: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.device = device
        self.autocast = autocast
        self.modules = {weights: module}
        self.default_weights = weights
        self.weight_choices = list(WEIGHTS) if raw_available else [weights]
        self.max_images = max_images
        self.batch_size = batch_size
        self.trajectory_images = trajectory_images
        self.trajectory_columns = trajectory_columns
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="flowerdiff-explore-"))
        self.load_seconds = 0.0 if started is None else time.perf_counter() - started

    # -- what the page offers -------------------------------------------------------------
    @property
    def model(self) -> DiffusionModule:
        return self.modules[self.default_weights]

    @property
    def default_sampler(self) -> Sampler:
        return self.model.diffusion.sampler

    @property
    def sampler_names(self) -> list[str]:
        return SAMPLERS.names()

    @property
    def class_choices(self) -> list[str]:
        """``EVERY_CLASS``, ``UNCONDITIONAL`` and ``"k: name"`` per class ([] unconditional)."""
        count = self.model.num_classes
        if count is None:
            return []
        names = self.model.spec.class_names if self.model.spec else None
        return [EVERY_CLASS, UNCONDITIONAL] + [
            f"{k}: {names[k]}" if names else f"{k}: class {k}" for k in range(count)
        ]

    def describe(self) -> str:
        """A Markdown line on the model."""
        module, sampler = self.model, self.default_sampler
        spec = module.spec
        network = spec.network.get("name", "network") if spec else type(module.net).__name__
        parameters = sum(p.numel() for p in module.net.parameters())
        classes = (
            f"{module.num_classes} classes" if module.num_classes is not None else "unconditional"
        )
        shape = "×".join(str(v) for v in module.image_shape)
        return (
            f"**flowerdiff explorer** · `{self.path}` · {network} ({parameters / 1e6:.1f}M "
            f"parameters), {module.diffusion.name} diffusion, {shape} images, {classes} · "
            f"default sampler {SAMPLERS.name_of(type(sampler))} with "
            f"{sampler.num_inference_steps} steps · running on {self.device} (loaded in "
            f"{self.load_seconds:.1f} s)"
        )

    # -- the shared controls --------------------------------------------------------------
    def module(self, weights: str) -> DiffusionModule:
        """The model with ``weights``; the other set is loaded on first use."""
        if weights not in self.weight_choices:
            raise ValueError(
                f"`weights={weights!r}` is not available: this model has "
                f"{' and '.join(self.weight_choices)} weights."
            )
        if weights not in self.modules:
            self.modules[weights] = load_model(self.path, self.device, weights)
        return self.modules[weights]

    def settings(
        self,
        weights: str,
        sampler_name: str,
        steps: Any,
        eta: Any,
        class_choice: str | None,
        guidance_scale: Any,
    ) -> Settings:
        """The shared controls, checked (ValueError with the control's name and the fix)."""
        module = self.module(weights or self.default_weights)
        notes: list[str] = []
        if sampler_name not in self.sampler_names:
            raise ValueError(
                f"`sampler={sampler_name!r}` is not known; choose one of "
                f"{', '.join(self.sampler_names)}."
            )
        steps = _integer(steps, "steps", minimum=1)
        own = SAMPLERS.name_of(type(module.diffusion.sampler)) == sampler_name
        eta_value = None
        if sampler_name == "ddim":
            eta_value = _number(eta, "eta", "0 = deterministic DDIM, 1 = DDPM-like")
        elif eta is not None and eta != self.default_eta:
            notes.append(f"eta applies to DDIM only; {sampler_name} ignores it.")
        sampler = configured_sampler(
            module.diffusion, None if own else {"name": sampler_name}, steps, eta_value
        )
        scale = 1.0 if guidance_scale is None else guidance_scale
        if module.num_classes is None:
            if class_choice not in (None, "", UNCONDITIONAL):
                raise ValueError(
                    f"`class={class_choice!r}`: this model is unconditional (trained without "
                    "model.net.num_classes), so it takes no class."
                )
            if _number(scale, "guidance scale", "1 = no guidance") != 1.0:
                raise ValueError(
                    f"`guidance scale={guidance_scale}` applies to class-conditional models; "
                    "this one is unconditional. Set it to 1."
                )
            return Settings(module, sampler, None, False, None, tuple(notes))
        choice = class_choice or EVERY_CLASS
        every_class, label = choice == EVERY_CLASS, None
        if choice not in (EVERY_CLASS, UNCONDITIONAL):
            number = choice.split(":", 1)[0].strip()
            if not number.isdigit():
                raise ValueError(f"`class={choice!r}` is not one of the model's classes.")
            label = int(module.check_labels(torch.tensor([int(number)]))[0])
        scale = _number(scale, "guidance scale", "1 = plain conditional, 0 = unconditional")
        guidance = Guidance(scale) if scale != 1.0 else None
        if guidance is not None and label is None and not every_class:
            raise ValueError(
                f"`guidance scale={scale:g}` needs a class: choose one (or every class in turn), "
                "or set the guidance scale to 1 for unconditional images."
            )
        return Settings(module, sampler, label, every_class, guidance, tuple(notes))

    @property
    def default_eta(self) -> float:
        return float(getattr(self.default_sampler, "eta", 1.0))

    # -- the operations -------------------------------------------------------------------
    def generate(
        self,
        seed: Any,
        num_images: Any,
        weights: str,
        sampler_name: str,
        steps: Any,
        eta: Any,
        class_choice: str | None = None,
        guidance_scale: Any = 1.0,
    ) -> Result:
        """Images ``0 .. n-1`` of ``seed``: the pixels scripts/sample.py writes."""
        settings = self.settings(weights, sampler_name, steps, eta, class_choice, guidance_scale)
        seed = _integer(seed, "seed", minimum=0)
        count = _integer(num_images, "number of images", 1, self.max_images)
        start = time.perf_counter()
        images, first = [], None
        for batch in sample_batches(
            settings.module,
            count,
            seed=seed,
            batch_size=self.batch_size,
            sampler=settings.sampler,
            labels=settings.labels(count),
            guidance=settings.guidance,
            autocast=self.autocast,
            trajectory_images=self.trajectory_images,
            progress=True,
        ):
            first = first or batch.output
            images.append(batch.output.images.cpu())
        return self._result(
            torch.cat(images), first, settings, time.perf_counter() - start, f"seed {seed}"
        )

    def image_to_image(
        self,
        image: Any,
        strength: Any,
        seed: Any,
        num_images: Any,
        weights: str,
        sampler_name: str,
        steps: Any,
        eta: Any,
        class_choice: str | None = None,
        guidance_scale: Any = 1.0,
    ) -> Result:
        """``num_images`` variations of ``image`` (SDEdit), image k seeded by (seed, k)."""
        settings = self.settings(weights, sampler_name, steps, eta, class_choice, guidance_scale)
        picture = _image(image, "Image to image")
        strength = _number(strength, "strength", "0 keeps the image, 1 replaces it")
        check_strength(strength)
        seed = _integer(seed, "seed", minimum=0)
        count = _integer(num_images, "number of images", 1, self.max_images)
        source = to_model_image(picture, settings.module.image_shape)
        return self._edit(
            editing.image_to_image,
            settings,
            source.expand(count, -1, -1, -1),
            f"seed {seed}, strength {strength:g}",
            strength=strength,
            seed=seed,
        )

    def inpaint(
        self,
        editor: Any,
        jump_length: Any,
        resample: Any,
        seed: Any,
        num_images: Any,
        weights: str,
        sampler_name: str,
        steps: Any,
        eta: Any,
        class_choice: str | None = None,
        guidance_scale: Any = 1.0,
    ) -> Result:
        """Repaint what was drawn over the image (RePaint), ``num_images`` times."""
        settings = self.settings(weights, sampler_name, steps, eta, class_choice, guidance_scale)
        if not isinstance(editor, dict) or editor.get("background") is None:
            raise ValueError(
                "Inpainting: upload an image first, then draw over the region to repaint."
            )
        picture = _image(editor["background"], "Inpainting")
        shape = settings.module.image_shape
        mask = to_model_mask(
            [layer for layer in editor.get("layers") or [] if layer is not None],
            picture.size,
            shape,
        )
        if mask.sum() == 0:
            raise ValueError(
                "Inpainting: nothing is drawn. Paint over the region to repaint with the brush "
                "(the drawing is the mask; the rest of the image is kept)."
            )
        jump_length = _integer(jump_length, "jump length", 1, 100)
        resample = _integer(resample, "resampling", 1, 20)
        seed = _integer(seed, "seed", minimum=0)
        count = _integer(num_images, "number of images", 1, self.max_images)
        source = to_model_image(picture, shape)
        return self._edit(
            editing.inpaint,
            settings,
            source.expand(count, -1, -1, -1),
            f"seed {seed}, jump length {jump_length}, resampling {resample}",
            mask=mask,
            seed=seed,
            jump_length=jump_length,
            resample=resample,
        )

    def _edit(
        self,
        operation: Callable[..., SamplerOutput],
        settings: Settings,
        images: Tensor,
        what: str,
        **options: Any,
    ) -> Result:
        """Run an editing operation of flowerdiff.training.editing on ``images`` with the
        page's sampler, class and guidance, timed and rendered like a generation."""
        start = time.perf_counter()
        out = operation(
            settings.module,
            images,
            sampler=settings.sampler,
            labels=settings.labels(len(images)),
            guidance=settings.guidance,
            autocast=self.autocast,
            return_intermediates=self.trajectory_images > 0,
            progress=True,
            **options,
        )
        return self._result(out.images.cpu(), out, settings, time.perf_counter() - start, what)

    def interpolate(
        self,
        mode: str,
        seed_a: Any,
        seed_b: Any,
        image_a: Any,
        image_b: Any,
        frames: Any,
        weights: str,
        sampler_name: str,
        steps: Any,
        eta: Any,
        class_choice: str | None = None,
        guidance_scale: Any = 1.0,
    ) -> Result:
        """A row of ``frames`` images between two seeds (slerp of their noise) or two images
        (slerp of their inverted noise), and a back-and-forth animation."""
        settings = self.settings(weights, sampler_name, steps, eta, class_choice, guidance_scale)
        count = _integer(frames, "frames", 2, MAX_FRAMES)
        fractions = [k / (count - 1) for k in range(count)]
        notes = list(settings.notes)
        label = settings.label
        if settings.every_class:
            if settings.guidance is not None:
                raise ValueError(
                    "Interpolation makes images of one class: choose a class for guidance."
                )
            notes.append("Interpolation uses one class; no class chosen, so it is unconditional.")
        start = time.perf_counter()
        common = {
            "sampler": settings.sampler,
            "label": label,
            "guidance": settings.guidance,
            "autocast": self.autocast,
            "progress": True,
        }
        if mode == SEED_MODE:
            a = _integer(seed_a, "seed A", minimum=0)
            b = _integer(seed_b, "seed B", minimum=0)
            out = editing.interpolate_seeds(settings.module, a, b, fractions, **common)
            what = f"seeds {a} → {b}"
        elif mode == IMAGE_MODE:
            shape = settings.module.image_shape
            first = to_model_image(_image(image_a, "Image A"), shape)
            second = to_model_image(_image(image_b, "Image B"), shape)
            out = editing.interpolate_images(settings.module, first, second, fractions, **common)
            what = "two images"
        else:
            raise ValueError(f"`mode={mode!r}` must be {SEED_MODE!r} or {IMAGE_MODE!r}.")
        elapsed = time.perf_counter() - start
        images = out.images.cpu()
        frames_unit = [to_unit(image) for image in images]
        animation = save_gif(
            frames_unit + frames_unit[-2:0:-1], self._file("gif"), frame_ms=250, hold_last_ms=250
        )
        timings = self._timings(settings, len(images), elapsed, f"{what}, {count} frames")
        return Result(to_pil(grid(images, nrow=count)), None, animation, timings, notes)

    # -- rendering ------------------------------------------------------------------------
    def _file(self, suffix: str) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir / f"{uuid.uuid4().hex}.{suffix}"

    def _timings(self, settings: Settings, count: int, elapsed: float, what: str) -> str:
        sampler = settings.sampler
        name = SAMPLERS.name_of(type(sampler))
        eta = f", eta {sampler.eta:g}" if hasattr(sampler, "eta") else ""
        guidance = f", guidance {settings.guidance.scale:g}" if settings.guidance else ""
        classes = ""  # said, so that a caption tells what the page sent
        if settings.label is not None:
            classes = f" · class {settings.label}"
        elif settings.every_class:
            classes = " · classes in turn"
        return (
            f"{count} image{'s' * (count != 1)} in {elapsed:.2f} s ({elapsed / count:.2f} s per "
            f"image) · {name}, {sampler.num_inference_steps} steps{eta}{guidance} · {what}"
            f"{classes} · {self.device}"
        )

    def _result(
        self,
        images: Tensor,
        out: SamplerOutput | None,
        settings: Settings,
        elapsed: float,
        what: str,
    ) -> Result:
        strip, animation = None, None
        keep = min(self.trajectory_images, len(images))
        if out is not None and out.intermediates and keep > 0:
            figure = trajectory_figure(
                settings.module.diffusion, out, keep, self.trajectory_columns, True
            )
            strip = to_pil(figure.image)
            animation = save_gif(trajectory_frames(out, keep, True), self._file("gif"))
        timings = self._timings(settings, len(images), elapsed, what)
        return Result(to_pil(grid(images)), strip, animation, timings, list(settings.notes))


# -- the page ---------------------------------------------------------------------------------
def gradio() -> Any:
    """Gradio, imported on demand (the `explore` extra) and without usage reporting."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    return gr


def build_app(explorer: Explorer, num_images: int = 4) -> Any:
    """The page: shared controls above one tab per operation."""
    gr = gradio()
    model = explorer.model
    sampler = explorer.default_sampler
    conditional = model.num_classes is not None
    # Gradio keeps a copy of every image it sends; files older than an hour are deleted hourly.
    with gr.Blocks(
        title="flowerdiff explorer", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as app:
        gr.Markdown(explorer.describe(), elem_id="fd-model")
        with gr.Row():
            seed = gr.Number(0, label="Seed", precision=0, elem_id="fd-seed")
            count = gr.Slider(
                1, explorer.max_images, value=num_images, step=1, label="Images", elem_id="fd-count"
            )
            sampler_name = gr.Dropdown(
                explorer.sampler_names,
                value=SAMPLERS.name_of(type(sampler)),
                label="Sampler",
                elem_id="fd-sampler",
            )
            steps = gr.Number(
                sampler.num_inference_steps, label="Steps", precision=0, elem_id="fd-steps"
            )
            eta = gr.Number(explorer.default_eta, label="eta (DDIM only)", elem_id="fd-eta")
        with gr.Row(visible=conditional or len(explorer.weight_choices) > 1):
            class_choice = gr.Dropdown(
                explorer.class_choices or [UNCONDITIONAL],
                value=EVERY_CLASS if conditional else UNCONDITIONAL,
                label="Class",
                visible=conditional,
                elem_id="fd-class",
            )
            guidance = gr.Number(
                1.0,
                label="Guidance scale w (1: conditional, 0: unconditional)",
                visible=conditional,
                elem_id="fd-guidance",
            )
            weights = gr.Radio(
                explorer.weight_choices,
                value=explorer.default_weights,
                label="Weights",
                visible=len(explorer.weight_choices) > 1,
                elem_id="fd-weights",
            )
        shared = [weights, sampler_name, steps, eta, class_choice, guidance]

        def shown(label: str, key: str, height: int, kind: str = "pil") -> Any:
            """An output image, scaled up with square pixels (PNG: no lossy re-encoding)."""
            return gr.Image(
                label=label,
                format="png",
                type=kind,
                height=height,
                interactive=False,
                elem_id=f"fd-{key}",
                elem_classes="fd-pixels",
            )

        def upload(label: str, key: str) -> Any:
            return gr.Image(
                label=label,
                type="pil",
                image_mode="RGB",
                sources=["upload", "clipboard"],
                height=260,
                elem_id=f"fd-{key}",
            )

        def outputs(prefix: str) -> list[Any]:
            with gr.Row():
                image = shown("Images", f"{prefix}-images", 420)
                with gr.Column():
                    strip = shown(
                        "Denoising trajectory (rows: x, predicted x0)", f"{prefix}-strip", 200
                    )
                    animation = shown("Animation", f"{prefix}-animation", 200, "filepath")
            return [image, strip, animation, gr.Markdown(elem_id=f"fd-{prefix}-timings")]

        def button(label: str, key: str) -> Any:
            return gr.Button(label, variant="primary", elem_id=f"fd-{key}")

        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                generate_button = button("Generate", "generate")
                generate_outputs = outputs("generate")
            with gr.Tab("Image to image", id="img2img"):
                with gr.Row():
                    source = upload("Image", "img2img-input")
                    with gr.Column():
                        strength = gr.Slider(
                            0.0,
                            1.0,
                            value=0.5,
                            step=0.05,
                            label="Strength (0 keeps the image, 1 replaces it)",
                            elem_id="fd-strength",
                        )
                        img2img_button = button("Transform", "img2img")
                img2img_outputs = outputs("img2img")
            with gr.Tab("Inpainting", id="inpaint"):
                with gr.Row():
                    editor = gr.ImageEditor(
                        label="Image: paint over the region to repaint",
                        type="pil",
                        sources=["upload", "clipboard"],
                        transforms=(),
                        layers=False,
                        height=360,
                        brush=gr.Brush(default_size=2, colors=["#ff00ff"], color_mode="fixed"),
                        elem_id="fd-inpaint-input",
                    )
                    with gr.Column():
                        jump_length = gr.Number(
                            5, label="Jump length (levels)", precision=0, elem_id="fd-jump"
                        )
                        resample = gr.Number(
                            2, label="Resampling (1: none)", precision=0, elem_id="fd-resample"
                        )
                        inpaint_button = button("Inpaint", "inpaint")
                inpaint_outputs = outputs("inpaint")
            with gr.Tab("Interpolation", id="interpolate"):
                with gr.Row():
                    mode = gr.Radio(
                        [SEED_MODE, IMAGE_MODE], value=SEED_MODE, label="Between", elem_id="fd-mode"
                    )
                    seed_a = gr.Number(0, label="Seed A", precision=0, elem_id="fd-seed-a")
                    seed_b = gr.Number(1, label="Seed B", precision=0, elem_id="fd-seed-b")
                    frames = gr.Slider(
                        2, MAX_FRAMES, value=8, step=1, label="Frames", elem_id="fd-frames"
                    )
                with gr.Row():
                    image_a = upload("Image A", "image-a")
                    image_b = upload("Image B", "image-b")
                interpolate_button = button("Interpolate", "interpolate")
                with gr.Row():
                    path_image = shown("Frames", "interpolate-images", 200)
                    path_animation = shown("Animation", "interpolate-animation", 200, "filepath")
                path_timings = gr.Markdown(elem_id="fd-interpolate-timings")

        # Gradio finds the progress tracker by a positional parameter's default value, so the
        # handlers list their inputs; the sampler's tqdm bar is shown in the page.
        tracker = gr.Progress(track_tqdm=True)

        def run(operation: Callable[..., Result], *args: Any) -> Result:
            try:
                result = operation(*args)
            except (ValueError, CheckpointError) as error:
                raise gr.Error(str(error), title="Invalid input", print_exception=False) from error
            for note in result.notes:
                gr.Warning(note)
            return result

        def on_generate(seed, count, weights, name, steps, eta, label, scale, progress=tracker):
            result = run(explorer.generate, seed, count, weights, name, steps, eta, label, scale)
            return result.image, result.strip, result.animation, result.timings

        def on_img2img(
            image, strength, seed, count, weights, name, steps, eta, label, scale, progress=tracker
        ):
            result = run(
                explorer.image_to_image,
                *(image, strength, seed, count, weights, name, steps, eta, label, scale),
            )
            return result.image, result.strip, result.animation, result.timings

        def on_inpaint(
            value,
            jump,
            again,
            seed,
            count,
            weights,
            name,
            steps,
            eta,
            label,
            scale,
            progress=tracker,
        ):
            result = run(
                explorer.inpaint,
                *(value, jump, again, seed, count, weights, name, steps, eta, label, scale),
            )
            return result.image, result.strip, result.animation, result.timings

        def on_interpolate(
            how, a, b, first, second, n, weights, name, steps, eta, label, scale, progress=tracker
        ):
            result = run(
                explorer.interpolate,
                *(how, a, b, first, second, n, weights, name, steps, eta, label, scale),
            )
            return result.image, result.animation, result.timings

        generate_button.click(on_generate, [seed, count, *shared], generate_outputs)
        img2img_button.click(on_img2img, [source, strength, seed, count, *shared], img2img_outputs)
        inpaint_button.click(
            on_inpaint, [editor, jump_length, resample, seed, count, *shared], inpaint_outputs
        )
        interpolate_button.click(
            on_interpolate,
            [mode, seed_a, seed_b, image_a, image_b, frames, *shared],
            [path_image, path_animation, path_timings],
        )
    # One request at a time (the model is one), the others wait in the queue; the page itself
    # never waits on a request.
    app.queue(default_concurrency_limit=1, max_size=64)
    return app


# -- the command line -------------------------------------------------------------------------
def free_port(host: str) -> int:
    """A port the OS says is free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def check_address(host: Any, port: Any, problems: Problems) -> None:
    if not isinstance(host, str) or not host:
        problems.add(f"`host={host!r}` must be an address such as 127.0.0.1 (this machine only).")
        return
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
    ):
        problems.add(f"`port={port!r}` must be null (a free port) or a port number 1-65535.")
        return
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, port or 0))
    except OSError as error:
        what = f"port {port} on {host}" if port else f"host {host!r}"
        problems.add(
            f"`host={host}` / `port={port}`: cannot listen on {what} ({error.strerror or error}). "
            "Choose another port (or port=null for a free one), and a local address such as "
            "127.0.0.1."
        )


def raw_weights_available(path: str | Path) -> bool:
    """A training checkpoint with EMA keeps the raw weights too; its keys are read through a
    memory map (no tensor is loaded), after load_model has accepted the file."""
    if is_export(path):
        return False
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return isinstance(checkpoint, dict) and has_raw_weights(checkpoint)


def prepare(cfg: DictConfig, started: float | None = None) -> tuple[Any, Explorer]:
    """Check the command line, load the model as scripts/sample.py does, build the page.
    ConfigError / CheckpointError before anything is served."""
    started = time.perf_counter() if started is None else started
    problems = Problems()
    check_model_path(cfg, problems)
    for key in ("num_images", "max_images", "batch_size", "trajectory_columns"):
        check_positive_int(cfg.get(key), key, problems)
    check_positive_int(cfg.get("trajectory_images"), "trajectory_images", problems, minimum=0)
    if not problems.messages and cfg.num_images > cfg.max_images:
        problems.add(f"`num_images={cfg.num_images}` exceeds `max_images={cfg.max_images}`.")
    if cfg.get("weights", "ema") not in WEIGHTS:
        problems.add(f"`weights={cfg.get('weights')!r}` must be ema or raw.")
    check_address(cfg.get("host"), cfg.get("port"), problems)
    try:
        gradio()
    except ImportError:
        problems.add(
            "The explorer needs Gradio, which is not installed. Install the `explore` extra: "
            "`pip install -e '.[explore]'` (`make install` does)."
        )
    module, device = load_for_sampling(cfg, problems)
    explorer = Explorer(
        cfg.ckpt_path,
        module,
        device,
        autocast_context(cfg.precision, device),
        weights=cfg.get("weights", "ema"),
        raw_available=raw_weights_available(cfg.ckpt_path),
        max_images=cfg.max_images,
        batch_size=cfg.batch_size,
        trajectory_images=cfg.trajectory_images,
        trajectory_columns=cfg.trajectory_columns,
        started=started,
    )
    return build_app(explorer, cfg.num_images), explorer


def launch(
    app: Any, explorer: Explorer, host: str, port: int | None, open_browser: bool = False
) -> str:
    """Serve the page (in a background thread) and return its address."""
    gr = gradio()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests
    _, url, _ = app.launch(
        server_name=host,
        server_port=port or free_port(host),
        inbrowser=open_browser,
        prevent_thread_lock=True,
        show_error=True,
        share=False,
        ssr_mode=False,
        allowed_paths=[str(explorer.work_dir)],
        theme=gr.themes.Default(),
        css=CSS,
        footer_links=[],
        quiet=True,
    )
    return url


def explore(cfg: DictConfig) -> None:
    """Serve the explorer until Ctrl-C."""
    started = time.perf_counter()
    app, explorer = prepare(cfg, started)
    url = launch(app, explorer, cfg.host, cfg.port, bool(cfg.get("open_browser", False)))
    print(
        f"flowerdiff explorer: {url}  (model loaded in {time.perf_counter() - started:.1f} s; "
        "Ctrl-C stops it)",
        flush=True,
    )
    try:
        app.block_thread()
    finally:
        app.close()
        shutil.rmtree(explorer.work_dir, ignore_errors=True)
