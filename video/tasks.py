"""Video tasks: VideoMAE pretraining (``videomae_pretrain``).

The clip dataset (:class:`mm3d.video.data.VideoDataset`) decodes and augments clips in the
loader workers; tube masks are drawn by the model on the device for each batch (validation uses
masks from a fixed-seed generator, so validation losses are comparable between evaluations).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from mm3d.checkpoint import extract_state_dict, load_checkpoint, load_model_weights
from mm3d.config import ConfigError, RunConfig
from mm3d.engine import OptimizerStep, SplitMeans, autocast, batch_size_of, move_to_device, unwrap
from mm3d.errors import MissingFileError, UserError
from mm3d.masking import video_mask
from mm3d.registry import register_task
from mm3d.task import EvalResult, Task
from mm3d.trainer import build_optimizer, peak_lr
from mm3d.video import data as D
from mm3d.video import transforms as TR
from mm3d.video.decode import VideoDecodeError, check_decode_settings
from mm3d.video.convert import ours_to_hf
from mm3d.video.models import VideoMAEConfig, VideoMAEPretrain, build_pretrain_model
from mm3d.video.shards import VideoShardDataset, check_shard_keys, shard_dataset_spec
from mm3d.video.tokens import adapt_pos_embeds, token_grid
from mm3d.video.visualize import write_visualization

log = logging.getLogger(__name__)

__all__ = ["VideoDataConfig", "VideoPretrainConfig", "VideoMAEPretrainTask", "build_video_dataset",
           "clip_preprocessing", "resolve_list"]


@dataclass
class VideoDataConfig:
    """The ``data`` section of a video run.

    Lists (see :func:`mm3d.video.data.read_annotation_list`): ``path label`` (VideoMAE /
    mmaction2), ``path start total_frames`` (VideoMAEv2 pretraining, ``path 0 -1`` for video
    files) or ``dir total_frames label`` (rawframes). Relative paths inside a list are joined to
    `root`; a relative list path is looked up in the working directory, then under `root`.
    ``train_list`` / ``val_list`` may name several lists separated by commas (read in order).

    ``format: shards`` reads prepared shards (``mm3d data prepare``) instead of the lists:
    ``shards`` is the training split (a shard folder, a ``manifest.json``, a brace pattern
    ``"dir/shard-{000000..000012}.tar"``, or a prepared root whose ``dataset.json`` names its
    splits, which then also gives the validation split unless ``val_shards`` names one).
    ``shuffle_buffer``: the trainer's sampler shuffles samples within windows of this many
    (:class:`mm3d.shards.ShardSampler`).
    """

    format: Literal["files", "shards"] = "files"  # files: the lists below; shards: prepared shards
    shards: str = ""
    val_shards: str = ""
    shuffle_buffer: int = 1000
    root: str = ""
    train_list: str = ""
    val_list: str = ""  # optional: a held-out list for the validation loss and the report pictures
    list_format: Literal["auto", "video", "pretrain", "rawframes"] = "auto"
    label_map: str = ""  # class names, one a line (lets lists name classes; optional for pretraining)
    num_frames: int | None = None  # frames per clip (None: model.num_frames)
    sampling_rate: int = 4  # frame step of dense sampling: 4 Kinetics, 2 SSv2
    sampling: Literal["dense", "segment"] = "dense"  # segment: TSN sampling (SSv2-style data)
    input_size: int | None = None  # crop size (None: model.img_size)
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)  # VideoMAE's multi-scale crop
    flip: bool = False  # VideoMAE pretraining does not flip
    num_sample: int = 1  # repeated augmentation: views per decoded clip (VideoMAEv2 uses 4)
    backend: Literal["auto", "decord", "pyav", "torchcodec"] = "auto"  # see mm3d.video.decode
    decode_device: Literal["cpu", "cuda"] = "cpu"  # cuda: torchcodec only, frames stay on the GPU
    num_threads: int = 1  # decoder threads per loader worker
    rawframe_template: str = "img_{:05d}.jpg"
    rawframe_start: int = 1
    max_failure_ratio: float = 0.01  # fail once this share of the videos could not be read
    report_clips: int = 2  # reconstruction pictures written after training (0: none)

    def validate(self) -> None:
        if self.sampling_rate < 1 or self.num_sample < 1 or self.num_threads < 0:
            raise ValueError(f"sampling_rate and num_sample must be >= 1 and num_threads >= 0, got "
                             f"{self.sampling_rate}, {self.num_sample}, {self.num_threads}")
        if not self.scales or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must be in (0, 1], got {self.scales}")
        if not 0.0 <= self.max_failure_ratio <= 1.0:
            raise ValueError(f"max_failure_ratio must be in [0, 1], got {self.max_failure_ratio}")
        if self.report_clips < 0:
            raise ValueError(f"report_clips must be >= 0, got {self.report_clips}")
        check_decode_settings(self.backend, self.decode_device)
        check_shard_keys(self)


@dataclass
class VideoPretrainConfig(RunConfig):
    """A VideoMAE pretraining run."""

    task: str = "videomae_pretrain"
    model: VideoMAEConfig = field(default_factory=VideoMAEConfig)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)

    paper_reference: ClassVar[str] = "VideoMAE run_mae_pretraining.py, MODEL_ZOO.md"

    def paper_protocol(self) -> dict[str, Any]:
        """``train.select_on: last``: ``run_mae_pretraining.py`` evaluates nothing and the
        fine-tuning scripts load the last epoch's checkpoint. Our benchmark pretraining configs say
        so already (the preset changes nothing for them); it matters only for a config that gives a
        ``data.val_list`` and would otherwise report the epoch of least validation loss."""
        return {"train": {"select_on": "last"}}

    def validate(self) -> None:
        super().validate()
        if self.data.num_frames is not None and self.data.num_frames != self.model.num_frames:
            raise ValueError(f"data.num_frames={self.data.num_frames} differs from model.num_frames="
                             f"{self.model.num_frames}; set one (data.num_frames may stay null)")
        if self.data.decode_device != "cpu" and self.train.num_workers > 0:
            raise ValueError(f"data.decode_device={self.data.decode_device} decodes in the training process: set "
                             f"train.num_workers=0 (CUDA does not work in forked loader workers)")
        if self.data.input_size is not None and self.data.input_size != self.model.img_size:
            raise ValueError(f"data.input_size={self.data.input_size} differs from model.img_size="
                             f"{self.model.img_size}; set one (data.input_size may stay null)")


def resolve_list(path: str, root: str) -> Path:
    """A list file: as given, else under `root`; FileNotFoundError naming both when absent."""
    p = Path(path)
    if p.is_file():
        return p
    if root and not p.is_absolute() and (Path(root) / p).is_file():
        return Path(root) / p
    where = f" (nor under data.root={root!r})" if root else ""
    raise MissingFileError(f"annotation list {path!r} not found{where}")


def build_video_dataset(data: VideoDataConfig, list_path: str, *, mode: Literal["train", "test"],
                        num_frames: int, input_size: int, seed: int = 0, split: str = "train") -> Dataset:
    """The clips of one list (``data.format: files``), or of the shards of `split` when `list_path` is
    empty and ``data.format`` is ``shards`` (:class:`~mm3d.video.shards.VideoShardDataset`, same
    items): pretraining augmentation in ``train`` mode, a centre crop (one clip, one crop) in
    ``test`` mode."""
    if mode == "train":
        transform = TR.pretrain_transform(input_size, data.scales, flip=data.flip)
    else:
        transform = TR.test_transform(input_size, input_size, 1)
    options = dict(mode=mode, num_frames=num_frames, sampling_rate=data.sampling_rate, sampling=data.sampling,
                   num_clips=1, num_crops=1, num_sample=data.num_sample if mode == "train" else 1,
                   transform=transform, backend=data.backend, num_threads=data.num_threads,
                   decode_device=data.decode_device, max_failure_ratio=data.max_failure_ratio, seed=seed)
    if data.format == "shards":
        spec = shard_dataset_spec(data.shards, data.val_shards, "", split)
        if spec is None:
            raise ConfigError(f"data.format=shards: no shards for the {split} split (data.shards={data.shards!r})")
        return VideoShardDataset(spec, split=split, **options)
    records = []
    for one in (p.strip() for p in list_path.split(",") if p.strip()):
        records += D.read_annotation_list(resolve_list(one, data.root), fmt=data.list_format,
                                          data_root=data.root, label_map=data.label_map or None)
    return D.VideoDataset(records, rawframe_template=data.rawframe_template, rawframe_start=data.rawframe_start,
                          **options)


def _flatten_views(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate repeated-augmentation items: (S, C, T, H, W) views become S batch entries."""
    video = torch.stack([s["video"] for s in samples])  # (B, S, C, T, H, W)
    views = video.shape[1]
    out = {"video": video.flatten(0, 1)}
    for key in ("label", "index"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples]).repeat_interleave(views)
    return out


def clip_preprocessing(model: VideoMAEConfig, *, sampling: str, sampling_rate: int, short_side: int, clips: int,
                       crops: int) -> dict[str, Any]:
    """The model card's input recipe of a VideoMAE model (:meth:`mm3d.task.Task.preprocessing`): the
    evaluation views of the test transform, as ``mm3d predict`` builds them."""
    return {"input": "video", "shape": [model.in_chans, model.num_frames, model.img_size, model.img_size],
            "layout": "C T H W", "dtype": "float32", "color": "RGB", "frames": model.num_frames,
            "sampling": sampling, "sampling_rate": sampling_rate, "short_side": short_side, "size": model.img_size,
            "views": {"clips": clips, "crops": crops, "clip_placement": "evenly spread over the video",
                      "crop_placement": "centre" if crops == 1 else f"{crops} crops along the long side",
                      "combine": "mean of the views' softmax"},
            "scale": "pixel / 255", "mean": list(TR.IMAGENET_DEFAULT_MEAN), "std": list(TR.IMAGENET_DEFAULT_STD)}


class VideoMAEPretrainTask(Task):
    """VideoMAE pretraining: tube-masked pixel reconstruction of video clips."""

    name = "videomae_pretrain"
    modality = "video"
    stage = "pretrain"
    config_class = VideoPretrainConfig
    description = "VideoMAE masked-video pretraining (tube masking, pixel reconstruction)"

    def build_model(self, cfg: VideoPretrainConfig) -> nn.Module:
        return build_pretrain_model(cfg.model)

    def preprocessing(self, cfg: VideoPretrainConfig) -> dict[str, Any]:
        """One centre view (the evaluation split's), ``model.num_frames`` frames at ``data.sampling_rate``."""
        return clip_preprocessing(cfg.model, sampling=cfg.data.sampling, sampling_rate=cfg.data.sampling_rate,
                                  short_side=cfg.model.img_size, clips=1, crops=1)

    def build_datasets(self, cfg: VideoPretrainConfig, splits: Iterable[str]) -> dict[str, Dataset]:
        """The training (and validation) clips of the lists, or of the prepared shards (``data.format``)."""
        d = cfg.data
        splits = list(splits)
        shards = d.format == "shards"
        if not shards and not d.train_list and "train" in splits:
            raise ConfigError("data.train_list is empty: give an annotation list (data.train_list=FILE, "
                             "with data.root=DIR for relative paths)")
        size, frames = cfg.model.img_size, cfg.model.num_frames
        has = {"train": bool(d.train_list), "val": bool(d.val_list)}
        if shards:
            has = {s: shard_dataset_spec(d.shards, d.val_shards, "", s) is not None for s in has}
        out: dict[str, Dataset] = {}
        if "train" in splits and has["train"]:
            out["train"] = build_video_dataset(d, "" if shards else d.train_list, mode="train", num_frames=frames,
                                               input_size=size, seed=cfg.seed, split="train")
        if "val" in splits and has["val"]:
            out["val"] = build_video_dataset(d, "" if shards else d.val_list, mode="test", num_frames=frames,
                                             input_size=size, seed=cfg.seed, split="val")
        return out

    def collate_fn(self, cfg: VideoPretrainConfig) -> Callable[[list[Any]], Any] | None:
        return _flatten_views if cfg.data.num_sample > 1 else None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Any], cfg: VideoPretrainConfig, device: torch.device,
                 split: str) -> EvalResult:
        """Mean reconstruction loss with masks from a generator seeded by ``cfg.seed``."""
        model.eval()
        raw = unwrap(model)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        means = SplitMeans(["loss"], device)
        for batch in loader:
            batch = move_to_device(batch, device)
            n = batch_size_of(batch)
            mask, dec_mask = raw.sample_masks(n, device, generator=gen, video=batch["video"])
            batch = {**batch, "mask": mask, **({"decoder_mask": dec_mask} if dec_mask is not None else {})}
            means.update(n, {"loss": model(batch).loss})
        return EvalResult(means.compute())

    def init_weights(self, model: nn.Module, path: str, cfg: VideoPretrainConfig) -> list[str]:
        """Start from one of our checkpoints or converted weights; a position table of another grid
        (other frame count or size) is interpolated and reported."""
        ck = load_checkpoint(path, allow_pickle=cfg.allow_pickle)
        sd = {k.removeprefix("module."): v for k, v in extract_state_dict(ck).items()}
        notes = []
        m = (ck.get("config") or {}).get("model") if isinstance(ck.get("config"), dict) else None
        if m:
            old = token_grid(m["num_frames"], m["img_size"], m["tubelet_size"], m["patch_size"])
            notes += adapt_pos_embeds(sd, model, old)
        return notes + load_model_weights(model, sd, strict=False)

    def _report_clips(self, datasets: dict[str, Dataset], count: int) -> list[tuple[str, torch.Tensor]]:
        split = "val" if "val" in datasets else "train"
        ds = datasets.get(split)
        if ds is None or count == 0:
            return []
        step = max(len(ds) // count, 1)
        clips = []
        for i in list(range(0, len(ds), step))[:count]:
            video = ds[i]["video"]
            if video.dim() == 5:  # repeated augmentation: the first view
                video = video[0]
            clips.append((f"{split}_{i:05d}", video))
        return clips

    def write_report(self, run_dir: Path, model: nn.Module, cfg: VideoPretrainConfig,
                     results: dict[str, EvalResult], datasets: dict[str, Dataset],
                     device: torch.device) -> list[Path]:
        """Reconstruction grids (PNG) and animations (GIF) of a few clips in ``run_dir/plots``."""
        model = unwrap(model)
        if not isinstance(model, VideoMAEPretrain) or not model.reconstructs_pixels:
            return []  # (a model predicting HOG or features has no pixels to show)
        files: list[Path] = []
        for i, (name, video) in enumerate(self._report_clips(datasets, cfg.data.report_clips)):
            files += write_visualization(model, video[None], run_dir / "plots", seed=cfg.seed + i,
                                         name=f"reconstruction_{name}")
        return files

    def visualize(self, model: nn.Module, cfg: VideoPretrainConfig, *, inputs: list[str],
                  dataset_index: int | None, out_dir: Path, interactive: bool, seed: int,
                  device: torch.device) -> list[Path]:
        """``mm3d visualize``: reconstruction grid + animation of each video file (its centre clip)
        or of item `dataset_index` of the configured validation (else training) list."""
        model = unwrap(model)
        if interactive:
            log.info("video reconstructions are written as PNG and GIF files; no window is opened")
        files: list[Path] = []
        for path in inputs:
            try:
                files += write_visualization(model, path, out_dir, seed=seed, sampling_rate=cfg.data.sampling_rate)
            except (VideoDecodeError, OSError) as e:
                raise UserError(f"--input: {e}") from None
        if dataset_index is not None:
            ds = self.build_datasets(cfg, ["val"] if cfg.data.val_list else ["train"])
            split, data = next(iter(ds.items()))
            if not 0 <= dataset_index < len(data):
                raise UserError(f"--dataset-index {dataset_index} is out of range: the {split} list has "
                                f"{len(data)} videos")
            video = data[dataset_index]["video"]
            video = video[0] if video.dim() == 5 else video
            files += write_visualization(model, video[None], out_dir, seed=seed, name=f"{split}_{dataset_index:05d}")
        if not files:
            raise UserError("nothing to visualise: give --input VIDEO or --dataset-index I")
        return files

    def bench_extra(self, cfg: VideoPretrainConfig, device: torch.device) -> list[dict[str, Any]]:
        """Loader throughput of one worker on the training list (decode + augmentation per clip),
        for each available decoder."""
        rows = []
        backends = ["pyav"] + (["decord"] if importlib.util.find_spec("decord") is not None else [])
        n = max(8, cfg.bench.loader_batches)
        for backend in backends:
            d = replace(cfg.data, backend=backend, max_failure_ratio=1.0)
            ds = build_video_dataset(d, d.train_list, mode="train", num_frames=cfg.model.num_frames,
                                     input_size=cfg.model.img_size, seed=cfg.seed)
            ds[0]  # warm up (imports, codec initialisation)
            t = time.perf_counter()
            for i in range(n):
                ds[i % len(ds)]
            dt = time.perf_counter() - t
            rows.append({"what": "train clips/s per loader worker", "backend": backend,
                         "clips_per_s": round(n / dt, 2), "ms_per_clip": round(1e3 * dt / n, 1), "clips": n,
                         "videos": len(ds), "clip": f"{cfg.model.num_frames}x{cfg.model.img_size}^2",
                         "failed": len(ds.failed)})
        return rows

    def bench_peer(self, cfg: VideoPretrainConfig, model: nn.Module, batch: Any, device: torch.device
                   ) -> tuple[str, Callable[[], Any]] | None:
        """The same pretraining step with ``transformers.VideoMAEForPreTraining`` (our weights loaded,
        a fresh tube mask per step as ours, the same optimizer settings and precision); with
        ``bench.peer=official`` (or a ``bench.peer_root``), the official VideoMAE code of that checkout
        (:mod:`mm3d.video.peer`)."""
        if cfg.bench.peer == "official" or (cfg.bench.peer is True and cfg.bench.peer_root):
            if not cfg.bench.peer_root:
                log.warning("no peer timing: bench.peer=official needs bench.peer_root=<a checkout of "
                            "github.com/MCG-NJU/VideoMAE>")
                return None
            from mm3d.bench import peer_or_none
            from mm3d.video.peer import pretrain_peer_step

            return peer_or_none(pretrain_peer_step, cfg.bench.peer_root, cfg, model, batch, device)
        try:
            import transformers
        except ImportError:
            log.info("transformers is not installed: no peer timing")
            return None
        m = cfg.model
        if m.decoder_mask_type is not None:
            log.info("transformers' VideoMAE has no decoder masking: no peer timing")
            return None
        try:
            hf_sd, hf_cfg, _ = ours_to_hf({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, m, "pretrain")
        except ValueError as e:
            log.info("no peer timing: %s", e)
            return None
        with tempfile.TemporaryDirectory() as tmp:
            save_file(hf_sd, f"{tmp}/model.safetensors", metadata={"format": "pt"})
            Path(tmp, "config.json").write_text(json.dumps(hf_cfg))
            peer = transformers.VideoMAEForPreTraining.from_pretrained(tmp, attn_implementation="sdpa")
        peer = peer.to(device).train()
        opt_step = OptimizerStep(build_optimizer(peer, cfg, peak_lr(cfg, 1), fused=False), device=device,
                                 precision=cfg.train.precision, clip_grad=cfg.optim.clip_grad)
        pixels = batch["video"].transpose(1, 2).contiguous()  # HF layout (B, T, C, H, W)
        b = pixels.shape[0]

        def step() -> None:
            mask = video_mask(m.mask_type, b, m.grid, m.mask_ratio, device=device)
            with autocast(device, cfg.train.precision):
                loss = peer(pixel_values=pixels, bool_masked_pos=mask).loss
            opt_step.backward(loss)
            opt_step.step()

        return f"transformers {transformers.__version__} VideoMAEForPreTraining (sdpa)", step


register_task(VideoMAEPretrainTask())
