"""Collection rules for the whole tree (tests/ and the doctests of dirac_jax/).

PyTorch is optional. The two modules that import it at the top are not collected
for doctests without it; the tests that use them skip themselves
(`pytest.importorskip("torch")`).
"""

try:
    import torch  # noqa: F401
except ImportError:
    collect_ignore = ["dirac_jax/bench/_torch_reference.py", "tests/_reference_torch.py"]
