"""ONNX export of a loaded checkpoint and an onnxruntime path for generation (issue 19, item 3).

- ``export``: the UNet, the VAE decoder and encoder and the CLIP text encoder(s) of a UNet-family checkpoint
  (SD 1.x / 2.x / SDXL) through ``torch.onnx.export`` (torch's own, maintained exporter: the dynamo path, with
  onnxscript), with dynamic batch / height / width / sequence axes, into ``models/onnx/<stem>-<short hash>/``
  (optimum's folder and I/O names: ``unet/model.onnx``, ``vae_decoder/model.onnx``...) plus ``studio_onnx.json``
  naming the source file, its sha256, dtype and opset.
- ``runtime``: while a job runs with the ``onnx_runtime`` setting on, the checkpoint's UNet and VAE run in
  onnxruntime sessions behind their own ``forward`` / ``decode`` / ``encode``, so the studio's pipelines, samplers,
  callbacks, previews and infotext stay exactly as on torch. The text encoders stay on torch: textual-inversion
  embeddings and clip skip hook into their modules, and prompt embeddings are cached per text (a small share of
  the time).

Why not optimum's exporter: optimum (optimum-onnx) pins its own transformers range and rebuilds the pipeline from
a hub folder; the studio holds its components already loaded (single files, no network), which torch.onnx
exports directly.
"""
