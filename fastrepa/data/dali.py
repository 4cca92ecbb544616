"""A NVIDIA DALI loader for the packed layout: the torch loader's batches, decoded by DALI.

    loader = DALILoader(open_dataset("data/imagenet256-packed"), StepSampler(...), device="cuda")
    for batch in loader: ...   # {"image": uint8 [B, 3, H, W], "moments": float32 [B, 2C, h, w], "label": int64 [B]}

Order: the batches are exactly those of the StepSampler given (per-rank slice of the global batch, epoch
permutation from (seed, epoch), start at any step), fed to DALI through external_source; DALI only
decodes and transposes, so the batches equal the torch loader's (build_loader) for the same sampler:
- raw packs: bit for bit, on the CPU and the GPU;
- JPEG packs, device "cpu" (device_id=None): DALI's CPU decoder and PIL (the torch loader) are both
  libjpeg-turbo with its default (islow) IDCT and fancy upsampling; the tests check they agree bit for bit;
- JPEG packs on the GPU ("mixed" decoder: nvJPEG / the hardware decoder): not guaranteed bit-identical to
  libjpeg-turbo (other IDCT and chroma upsampling); expect differences of a few levels in a few pixels.
Moments and labels pass through unchanged (moments cast to float32, as the torch datasets do).

DALI is optional: `pip install fastrepa[dali]` (nvidia-dali-cuda130). This module imports it only when a
loader is built, so importing fastrepa.data never needs it.
"""
import numpy as np
import torch

from fastrepa.data.loader import as_batch
from fastrepa.distributed import resolve_device

INSTALL_HINT = "pip install fastrepa[dali]  (the PyPI package nvidia-dali-cuda130)"


def require_dali():
    """The nvidia.dali module, or an ImportError that says how to install it."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401 - feed_ndarray, to_torch_type
    except ImportError as e:
        raise ImportError(f"the DALI data loader needs NVIDIA DALI, which is not installed ({e}); install it "
                          f"with: {INSTALL_HINT}") from None
    return dali


def dali_available() -> bool:
    try:
        require_dali()
    except ImportError:
        return False
    return True


class _BatchSource:
    """external_source callback: the sampler's next batch as (images, moments, labels) numpy batches."""

    def __init__(self, dataset, batches):
        self.dataset, self.batches = dataset, batches

    def __call__(self):
        idx = np.asarray(next(self.batches), dtype=np.int64)  # StopIteration ends the pipeline's data
        ds = self.dataset
        arrays = ds._open()
        if ds.image_format == "raw":
            images = arrays["images"][idx]  # [B, H, W, 3], one gather from the memory map
        else:
            images = [ds.jpeg_bytes(i) for i in idx]
        moments = arrays["moments"][idx]
        if moments.dtype != np.float32:
            moments = moments.astype(np.float32)
        return images, moments, ds.labels[idx]


class DALILoader:
    """Iterable of (images uint8 [B, 3, H, W], moments float32 [B, 2C, h, w], labels int64 [B]) on `device`.

    dataset: a PackedDataset (or the path of one); sampler: a StepSampler (its batches, in its order);
    device: "cpu" (DALI CPU pipeline, device_id=None, CPU tensors), a CUDA device (JPEG decoded by the
    "mixed" decoder, tensors on that GPU), or None (the GPU when CUDA is available); num_threads: DALI CPU
    threads; prefetch: batches DALI prepares ahead. Each iteration builds a fresh pipeline and starts the
    sampler from its start_step again.
    """

    def __init__(self, dataset, sampler, device=None, num_threads: int = 2, prefetch: int = 2):
        require_dali()
        from fastrepa.data.packed import PackedDataset

        if isinstance(dataset, str):
            from fastrepa.data.loader import open_dataset
            dataset = open_dataset(dataset)
        if not isinstance(dataset, PackedDataset):
            where = getattr(dataset, "features_dir", None) or type(dataset).__name__
            raise ValueError(f"the DALI loader reads the packed layout; {where} is not one. Pack it with "
                             f"`python -m fastrepa.data.pack SRC DST` and point --data-dir at DST")
        if sampler.num_items != len(dataset):
            raise ValueError(f"the sampler indexes {sampler.num_items} items but {dataset.root} holds {len(dataset)}")
        if num_threads < 1 or prefetch < 1:
            raise ValueError(f"num_threads={num_threads}, prefetch={prefetch}: expected >= 1")
        self.dataset, self.sampler = dataset, sampler
        self.device = resolve_device(device, "DALI loader device")
        self.num_threads, self.prefetch = num_threads, prefetch
        self._pipe = None

    def _build(self):
        dali = require_dali()
        fn, types = dali.fn, dali.types
        gpu = self.device.type == "cuda"
        jpeg = self.dataset.image_format == "jpeg"
        source = _BatchSource(self.dataset, iter(self.sampler))

        @dali.pipeline_def(batch_size=self.sampler.local_batch, num_threads=self.num_threads,
                           device_id=self.device.index if gpu else None, prefetch_queue_depth=self.prefetch)
        def pipeline():
            images, moments, labels = fn.external_source(
                source=source, num_outputs=3, batch=True,
                dtype=[types.UINT8, types.FLOAT, types.INT64], ndim=[1 if jpeg else 3, 3, 0])
            if jpeg:
                images = fn.decoders.image(images, device="mixed" if gpu else "cpu", output_type=types.RGB)
            elif gpu:
                images = images.gpu()
            images = fn.transpose(images, perm=[2, 0, 1])
            if gpu:
                moments, labels = moments.gpu(), labels.gpu()
            return images, moments, labels

        pipe = pipeline()
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = tensor_list.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(t, out, cuda_stream=stream)
        return out

    def __iter__(self):
        self.close()
        self._pipe = self._build()
        pipe = self._pipe
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                return
            yield as_batch(*(self._to_torch(o) for o in outputs))

    def __len__(self):
        return len(self.sampler)

    def close(self):
        """Drop the pipeline (its threads and buffers)."""
        self._pipe = None
