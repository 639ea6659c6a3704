"""Only the optional C extension lives here; everything else is in pyproject.toml.

``psgrad._memory._cstream`` writes large per-sample results with streaming stores (NOTE [streaming writes] in
``src/psgrad/_memory/stream.py``). It is optional: where it cannot be compiled, installation goes on without it
and psgrad uses PyTorch's own kernels.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "psgrad._memory._cstream",
            sources=["src/psgrad/_memory/_cstream.c"],
            extra_compile_args=["-O3", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
