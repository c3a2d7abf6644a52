"""``diffopt bench``: the benchmark of the diffusers 'PyTorch 2.0' docs page, run on random-weight pipelines of
the public architectures, comparing eager diffusers, that page's torch.compile recipe and ``diffopt.optimize``.

Modules, in the order they run: ``configs`` (architectures) -> ``pipelines`` (build and call) -> ``recipes``
(what is applied) -> ``measure`` / ``runner`` (timing) -> ``output`` (tables, JSON, chart); ``command`` is the
CLI. Nothing heavy is imported here, so ``import diffopt.bench`` stays cheap. See docs/benchmarks.md.

Example::

    $ python -m diffopt.bench --pipelines sd-txt2img --recipes sdpa,diffusers-compile --batch-sizes 1
"""
