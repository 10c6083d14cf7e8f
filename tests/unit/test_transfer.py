"""Moving a step's inputs to the device: CPU runs keep their generators, device draws are keyed,
uint8 pixels become the decoder's floats."""

from __future__ import annotations

import pytest
import torch

from prx_core.seeding import generator_for
from prx_core.transfer import device_generator, images_to_float, on_accelerator, simulated_accelerator, to_device

CPU = torch.device("cpu")


def test_on_a_cpu_no_device_generator_is_made() -> None:
    # The caller then draws from its CPU step generator as before: CPU numbers do not change.
    assert not on_accelerator(CPU)
    assert device_generator(0, "timesteps", 3, 1, 0, device=CPU) is None


def test_device_draws_are_a_function_of_their_keys() -> None:
    with simulated_accelerator():
        assert on_accelerator(CPU)
        first = device_generator(7, "timesteps", 3, 1, 0, device=CPU)
        again = device_generator(7, "timesteps", 3, 1, 0, device=CPU)
        other = device_generator(7, "timesteps", 3, 2, 0, device=CPU)
        assert first is not None and again is not None and other is not None
        draws = [torch.rand(4, generator=g) for g in (first, again, other)]
    assert not on_accelerator(CPU)  # the simulation ends with its block
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    # The same stream generator_for gives for those keys: nothing else goes into the seed.
    assert torch.equal(draws[0], torch.rand(4, generator=generator_for(7, "timesteps", 3, 1, 0)))


def test_to_device_leaves_a_tensor_already_there_alone() -> None:
    tensor = torch.arange(3)
    assert to_device(tensor, CPU) is tensor


def test_uint8_pixels_become_the_decoders_floats() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    as_float = images_to_float(pixels)
    expected = torch.tensor([i / 255 for i in range(256)], dtype=torch.float64).reshape(1, 1, 16, 16)
    assert as_float.dtype == torch.float32
    # fp32 division is correctly rounded: the float64 quotient rounded to fp32, bit for bit.
    assert torch.equal(as_float, expected.to(torch.float32))
    rendered = torch.rand(1, 3, 4, 4)
    assert images_to_float(rendered) is rendered  # float images are used as they are
    with pytest.raises(TypeError, match="uint8 or floating point"):
        images_to_float(pixels.to(torch.int32))


def test_a_packed_copy_gives_back_every_tensor_bit_for_bit() -> None:
    from prx_core.transfer import to_device_packed

    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.rand(2, 4, 3, 3, generator=generator),  # latent mean
        torch.randn(2, 5, 7, generator=generator).to(torch.bfloat16),  # text states (odd byte count)
        torch.rand(2, 5, generator=generator) > 0.5,  # mask
        torch.randint(0, 256, (2, 3, 5, 5), generator=generator, dtype=torch.uint8),  # pixels
        torch.rand(3, 2, generator=generator).t(),  # not contiguous
    ]
    with simulated_accelerator():
        moved = to_device_packed(tensors, CPU)
    for before, after in zip(tensors, moved, strict=True):
        assert after.dtype == before.dtype and after.shape == before.shape and torch.equal(after, before)
