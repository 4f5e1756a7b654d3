"""From a composed Hydra config to objects, with every problem reported at once, before work.

Validity has one source of truth: the constructors. Validation *builds* the components (the
network on the meta device, so even the 133M model costs nothing), collects every error they
raise, and reports each as one paragraph that names the key and the fix, all together in one
:class:`ConfigError`. Every entry point (train, sample, evaluate, export) goes through here
before anything heavy is loaded, decoded or sampled.

The model itself is built by registry name (:class:`~flowerdiff.training.spec.ModelSpec`);
``_target_`` + ``instantiate`` remains for the user's own configs only: data, optimizer,
learning-rate schedule, callbacks, loggers and the trainer.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.utils import instantiate
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from flowerdiff.diffusion import Diffusion, Sampler, build_diffusion, build_sampler
from flowerdiff.infra.checkpoints import checkpoint_spec, read_checkpoint
from flowerdiff.infra.devices import check_devices, check_precision, resolve_precision
from flowerdiff.registry import check_keys
from flowerdiff.training.module import DiffusionModule, lightning_refuses_fused
from flowerdiff.training.spec import ModelSpec

# Values Lightning resolves itself for `trainer.fit(ckpt_path=...)`.
SPECIAL_CKPT_PATHS = ("last", "hpc", "registry")
# Keys of `model` that are training options, not part of the network.
MODEL_OPTIONS = ("net", "compile", "channels_last", "label_dropout")


class ConfigError(ValueError):
    """The config cannot run; the message lists every problem and its fix."""


class Problems:
    """Collects one paragraph per problem; :meth:`raise_if_any` reports them together."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        if message not in self.messages:
            self.messages.append(message)

    @contextmanager
    def catch(self, key: str | None = None) -> Iterator[None]:
        """Run a build step; a ValueError / TypeError it raises becomes a problem. ``key``
        prefixes messages that do not already name a config key."""
        try:
            yield
        except (ValueError, TypeError, InstantiationException) as error:
            self.add(explain(error, key))

    def raise_if_any(self, what: str = "The config") -> None:
        if self.messages:
            n = len(self.messages)
            raise ConfigError(
                f"{what} has {n} problem{'s' if n > 1 else ''}; nothing was started.\n\n"
                + "\n\n".join(self.messages)
            )


def explain(error: BaseException, key: str | None) -> str:
    """The message of ``error`` (unwrapping Hydra's InstantiationException), naming ``key``."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    message = str(error)
    if key and "`" not in message:
        return f"`{key}`: {message}"
    return message


def plain(node: Any) -> Any:
    """A config node as resolved plain Python (dicts, lists, scalars)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# -- the model ------------------------------------------------------------------------------
def model_spec(cfg: DictConfig) -> ModelSpec:
    """The ModelSpec a training config describes; ValueError naming the key if it cannot."""
    network = model_network(cfg)
    diffusion = build_diffusion(plain(cfg.diffusion), plain(cfg.sampler))
    return ModelSpec(
        network=network,
        diffusion=diffusion.to_config(),
        image_shape=image_shape(cfg, network),
        class_names=class_names(cfg),
    )


def model_network(cfg: DictConfig) -> dict[str, Any]:
    """``model.net`` as a plain dict, after checking ``model`` holds only model options."""
    model = plain(cfg.model)
    unknown = [key for key in model if key not in MODEL_OPTIONS]
    if unknown:
        raise ValueError(
            f"`model.{unknown[0]}` is not a model option. Valid keys under `model` are: "
            f"{', '.join(MODEL_OPTIONS)} (the network's own settings go under `model.net`)."
        )
    return dict(model["net"])


def image_shape(cfg: DictConfig, network: dict[str, Any]) -> tuple[int, int, int]:
    image_size = cfg.data.image_size
    return (network.get("in_channels", 3), image_size, image_size)


def class_names(cfg: DictConfig) -> tuple[str, ...] | None:
    """The data's class names, when it has labels and a class-names file."""
    if not OmegaConf.select(cfg, "data.labels", default=False):
        return None
    datamodule = instantiate(cfg.data)
    names = datamodule.class_names()
    return tuple(names) if names is not None else None


def build_module(cfg: DictConfig, spec: ModelSpec | None = None) -> DiffusionModule:
    """The DiffusionModule of a training config (network, diffusion, optimizer, LR schedule)."""
    spec = spec or model_spec(cfg)
    model = cfg.model
    return DiffusionModule.from_spec(
        spec,
        optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        compile=bool(model.get("compile", False)),
        channels_last=bool(model.get("channels_last", False)),
        label_dropout=float(model.get("label_dropout", 0.0)),
    )


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """Every ``_target_`` entry of the ``callbacks`` group; ``null`` entries switch one off."""
    if not callbacks_cfg:
        return []
    built = []
    for name, node in callbacks_cfg.items():
        if node is not None and "_target_" in node:
            try:
                built.append(instantiate(node))
            except (ValueError, TypeError, InstantiationException) as error:
                raise ConfigError(explain(error, f"callbacks.{name}")) from error
    return built


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """Every ``_target_`` entry of the ``logger`` group (several at once with ``logger=many``)."""
    if not logger_cfg:
        return []
    return [instantiate(c) for c in logger_cfg.values() if c is not None and "_target_" in c]


def configured_sampler(
    diffusion: Diffusion,
    sampler: Any = None,
    steps: Any = None,
    eta: Any = None,
) -> Sampler:
    """The sampler a script asks for: ``sampler=...`` (else the model's own), with the
    ``steps`` and ``eta`` shortcuts applied to a new object (the model's is never changed) and
    checked by the constructors and by the model's family (e.g. steps <= T)."""
    chosen = build_sampler(plain(sampler)) if sampler else diffusion.sampler
    changes: dict[str, Any] = {}
    if steps is not None:
        changes["num_inference_steps"] = steps
    if eta is not None:
        if "eta" not in chosen.options():
            raise ValueError(
                f"`eta={eta}` only applies to DDIM, but the sampler is {type(chosen).__name__}. "
                "Drop `eta=...` or choose `sampler=ddim`."
            )
        changes["eta"] = eta
    if changes:
        chosen = chosen.with_options(**changes)
    diffusion.plan(chosen)
    return chosen


# -- validation ------------------------------------------------------------------------------
def validate_train_config(cfg: DictConfig) -> ModelSpec:
    """Build every part of a training config cheaply and raise :class:`ConfigError` listing all
    problems; returns the ModelSpec (the network was built on the meta device).

    The sampler, the diffusion family and the network are built separately, so that a bad
    sampler option does not hide a bad schedule or an image size the U-Net cannot take.
    """
    problems = Problems()
    network = None
    with problems.catch("model"):
        network = model_network(cfg)
    sampler = None
    with problems.catch("sampler"):
        sampler = build_sampler(plain(cfg.sampler))
    diffusion = None
    with problems.catch("diffusion"):
        # With a broken sampler, the family is still checked (with its default sampler).
        stand_in = sampler.to_config() if sampler is not None else {"name": "ddim"}
        diffusion = build_diffusion(plain(cfg.diffusion), stand_in)
    if diffusion is not None and sampler is not None:
        with problems.catch("sampler"):
            diffusion.plan(sampler)
    shape = None
    if network is not None:
        with problems.catch("model.net"), torch.device("meta"):
            shape = image_shape(cfg, network)
            try:
                ModelSpec(network, {}, shape).build_network()
            except RuntimeError as error:  # torch's own refusal, e.g. a negative layer size
                raise ValueError(
                    f"`model.net` cannot be built ({str(error).splitlines()[0]}). Check its "
                    "sizes (hidden_dims, attn_heads, attn_head_dim, norm_groups): positive "
                    "integers, as in conf/model/."
                ) from error
    with problems.catch("model"):  # the module's own options (the parts are checked above)
        DiffusionModule(
            torch.nn.Identity(),
            diffusion if diffusion is not None else torch.nn.Identity(),  # type: ignore[arg-type]
            (3, 1, 1),
            label_dropout=float(cfg.model.get("label_dropout", 0.0)),
        )
    names = None
    with problems.catch("data"):
        instantiate(cfg.data)
        names = class_names(cfg)
    check_optimizer(cfg, problems)
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if node is not None:
                check_target_keys(node, f"{group}.{name}", problems)
    check_target_keys(cfg.trainer, "trainer", problems, skip=("plugins", "strategy"))
    check_clipping(cfg.trainer, problems)
    with problems.catch("trainer.precision"):
        check_precision(cfg.trainer.get("precision", "32-true"))
        check_fused_clipping(cfg, problems)
    for message in check_devices(cfg):
        problems.add(message)
    check_ckpt_path(cfg.get("ckpt_path"), problems)
    try:
        output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None)
    except Exception:  # outside a Hydra run (compose API): nothing to check
        output_dir = None
    if output_dir is not None:
        check_output_dir(output_dir, "paths.output_dir", problems)
    problems.raise_if_any()
    assert network is not None and diffusion is not None and shape is not None
    spec = ModelSpec(network, diffusion.to_config(), shape, names)
    ckpt_path = str(cfg.get("ckpt_path"))
    if (
        cfg.get("ckpt_path") is not None
        and ckpt_path not in SPECIAL_CKPT_PATHS
        and ("://" not in ckpt_path)
    ):
        check_resume(ckpt_path, spec)  # `last` is resolved, and checked, by train()
    return spec


def check_optimizer(cfg: DictConfig, problems: Problems) -> None:
    """Build the optimizer (and LR schedule) on one dummy parameter: torch's own checks run;
    a learning rate of 0, which torch accepts, would train nothing."""
    if not cfg.get("optimizer"):
        return
    lr = OmegaConf.select(cfg, "optimizer.lr", default=None)
    if isinstance(lr, int | float) and not isinstance(lr, bool) and lr <= 0:
        problems.add(
            f"`optimizer.lr={lr}` must be > 0: it is the learning rate (the book: 1e-4; the "
            "CPU recipe: 1e-3)."
        )
        return
    if not check_target_keys(cfg.optimizer, "optimizer", problems):
        return  # a misspelled key: instantiating would only repeat it as a TypeError
    optimizer = None
    with problems.catch("optimizer"):
        optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    if (
        optimizer is not None
        and cfg.get("lr_scheduler")
        and check_target_keys(cfg.lr_scheduler, "lr_scheduler", problems)
    ):
        with problems.catch("lr_scheduler"):
            instantiate(cfg.lr_scheduler)(optimizer, 1000)


def check_clipping(trainer: DictConfig, problems: Problems) -> None:
    """Lightning passes a negative ``gradient_clip_val`` on to torch, whose clipping then flips
    the gradients' sign: training would climb the loss without a word."""
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0
    ):
        problems.add(
            f"`trainer.gradient_clip_val={clip!r}` must be a number >= 0 (e.g. 1.0), or null for "
            "no clipping."
        )
    algorithm = trainer.get("gradient_clip_algorithm")
    if algorithm not in (None, "norm", "value"):
        problems.add(f"`trainer.gradient_clip_algorithm={algorithm!r}` must be norm or value.")


def check_fused_clipping(cfg: DictConfig, problems: Problems) -> None:
    """An explicit ``optimizer.fused=true`` that Lightning would refuse only at the first training
    step, after the data load (``lightning_refuses_fused``), is refused here. (Left unset, fused
    is chosen only where Lightning allows it.)"""
    if OmegaConf.select(cfg, "optimizer.fused", default=None) is not True:
        return
    clip = cfg.trainer.get("gradient_clip_val")
    if not clip or isinstance(clip, bool) or not isinstance(clip, int | float):
        return
    precision = str(cfg.trainer.get("precision", "32-true"))
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if lightning_refuses_fused(resolve_precision(precision, accelerator), clipping=True):
        problems.add(
            f"`optimizer.fused=true` with `trainer.gradient_clip_val={clip}` under "
            f"`trainer.precision={precision}` (mixed precision here): Lightning cannot clip the "
            "gradients of a fused optimizer under mixed precision. Drop `optimizer.fused` "
            "(flowerdiff then fuses only where Lightning allows it), set "
            "`trainer.gradient_clip_val=null`, or train at `trainer.precision=32-true`."
        )


def check_target_keys(node: Any, key: str, problems: Problems, skip: tuple[str, ...] = ()) -> bool:
    """Keys of a ``_target_`` node (and of nested ones) that its target does not accept;
    True when it found none (the node may then be instantiated)."""
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return True
    target = node._target_
    constructor = locate(target)
    if constructor is None:
        problems.add(f"`{key}._target_={target!r}` cannot be imported; check the spelling.")
        return False
    before = len(problems.messages)
    values = {k: v for k, v in node.items() if not str(k).startswith("_") and k not in skip}
    with problems.catch(key):
        check_keys(constructor, values, key)
    for name, child in node.items():
        if OmegaConf.is_dict(child) and name not in skip:
            check_target_keys(child, f"{key}.{name}", problems)
    return len(problems.messages) == before


def locate(target: Any) -> Any:
    """The object a user config's dotted ``_target_`` names, or None (quietly: Hydra's own
    lookup helpers log an error for every miss)."""
    if not isinstance(target, str) or not target:
        return None
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                found = getattr(found, attribute)
        except AttributeError:
            return None
        return found
    return None


def check_ckpt_path(ckpt_path: Any, problems: Problems, key: str = "ckpt_path") -> None:
    """A resume path that does not exist, or is not a PyTorch checkpoint at all (random bytes,
    a truncated copy), fails now, not after the data has been decoded. Only the zip directory
    at the end of the file is read here; the contents are checked before training resumes."""
    if ckpt_path is None or str(ckpt_path) in SPECIAL_CKPT_PATHS or "://" in str(ckpt_path):
        return
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        problems.add(
            f"`{key}={ckpt_path!r}` is a folder; training resumes from a .ckpt file (an export "
            "holds no optimizer state and cannot be resumed). Pass e.g. "
            "<run dir>/checkpoints/last.ckpt, `last`, or null to start from scratch."
        )
    elif not path.is_file():
        problems.add(
            f"`{key}={ckpt_path!r}` does not exist. Pass the path of a .ckpt file written by "
            "training (e.g. outputs/train/runs/<date>/checkpoints/last.ckpt), `last` for this "
            "run directory's last checkpoint, or null to start from scratch."
        )
    elif not zipfile.is_zipfile(path):
        problems.add(
            f"`{key}={ckpt_path!r}` is not a PyTorch checkpoint (not a zip archive: truncated, "
            "or another kind of file). Resume from another checkpoint of the run, e.g. "
            "last.ckpt or a periodic epoch_*.ckpt, or start from scratch with ckpt_path=null."
        )


def check_resume(path: str, spec: ModelSpec) -> None:
    """The checkpoint to resume is a readable flowerdiff checkpoint of this very model (the
    sampler may differ: it is only the default for samples)."""
    stored = checkpoint_spec(read_checkpoint(path, "cpu"), path)

    def process(diffusion: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in diffusion.items() if key != "sampler"}

    same = (
        stored.network == spec.network
        and stored.image_shape == spec.image_shape
        and process(stored.diffusion) == process(spec.diffusion)
    )
    if not same:
        raise ConfigError(
            f"`ckpt_path={path}` was trained with another model (network {stored.network}, "
            f"diffusion {process(stored.diffusion)}, images {list(stored.image_shape)}) than this "
            f"config describes (network {spec.network}, diffusion {process(spec.diffusion)}, "
            f"images {list(spec.image_shape)}). Resume with the run's own overrides (see "
            "<run dir>/.hydra/overrides.yaml), or start fresh with ckpt_path=null."
        )


def check_output_dir(path: Any, key: str, problems: Problems) -> None:
    """The folder can be created and written to (checked before any work, by writing a temp
    file; folders created for the check are removed again, so a failed run leaves nothing)."""
    folder = Path(str(path)).expanduser().absolute()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        problems.add(
            f"`{key}={str(path)!r}` cannot be written: {error.strerror or error}. Choose a "
            f"folder you can write to (e.g. {key}=outputs/...)."
        )
    finally:
        for created in missing:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()


class RunDirCheck(HydraCallback):
    """Hydra callback: an unwritable ``hydra.run.dir`` becomes one paragraph and exit status 1,
    before Hydra fails to create the folder with a traceback of its own (it creates the run
    folder before the task, and so before :func:`~flowerdiff.tasks.errors.exit_on_user_error`,
    can check anything)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        problems = Problems()
        try:
            folder = OmegaConf.select(config, key)
        except Exception:  # unresolvable: Hydra's own error is the right one
            return
        if folder is not None:
            check_output_dir(folder, key, problems)
        if problems.messages:
            print(f"Error: {problems.messages[0]}", file=sys.stderr)
            raise SystemExit(1)


def check_positive_int(value: Any, key: str, problems: Problems, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.add(f"`{key}={value!r}` must be an integer >= {minimum}.")
