"""The cDAL training step as a MONAI engine: one discriminator and one generator update per batch.

D step (METHODS.md 1.2): draw i ~ U{0..T-1} and the pair (x_i, x_{i+1}) from the label x0 in {-1, 1};
real loss softplus(-D(x_i, i, x_{i+1})) plus the R1 penalty (gamma / 2) E||grad_{x_i} D||^2 every ``lazy_reg``
iterations (not rescaled, as the reference); fake loss softplus(D(x_pos, i, x_{i+1})) with
x_pos ~ q(x_i | x_{i+1}, G(x_{i+1}, i, z, I)).

G step: D frozen; a new i and pair; the attention map A is the channel mean of D's feature map
``attention_scale``, bilinearly upsampled, signed and not normalised; A * x0 is re-diffused to x~_{i+1} and the
loss is mean((x0 - G(x~_{i+1}, i, z, I))^2). The reference has no adversarial generator term.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.networks.schedulers import DDPMScheduler
from monai.utils import CommonKeys
from torch import nn
from torch.optim import Optimizer

from bundle.diffusion.samplers import unwrap_network
from bundle.diffusion.schedules import ForwardDiffusion
from bundle.engines.flags import as_bool

LOSS_KEYS = ("loss", "loss_g", "loss_d", "loss_d_real", "loss_d_fake", "r1")


def loss_outputs(output: dict) -> dict[str, float]:
    """The scalar losses of a ``CDALTrainer`` iteration output, for StatsHandler / MLFlowHandler."""
    return {k: float(output[k]) for k in LOSS_KEYS if k in output}


def attention_map(features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Spatial attention (B, 1, *size) from a discriminator feature map (B, K, h, w): channel mean, upsampled."""
    return F.interpolate(features.mean(dim=1, keepdim=True), size=tuple(size), mode="bilinear", align_corners=False)


class CDALTrainer(Trainer):
    """Trainer holding the cDAL generator and discriminator with their optimizers.

    Args:
        device: training device.
        max_epochs: epochs to train.
        train_data_loader: batches with ``image`` (B, C_img, H, W), normalised, and ``label`` (B, C, H, W) in
            {-1, 1}.
        generator: ``CDALGenerator`` (x0 prediction, ``forward(x_t, t, z, image=...)``, attribute ``nz``).
        discriminator: ``CDALDiscriminator`` (``forward`` and ``get_features``).
        g_optimizer: optimizer of the generator.
        d_optimizer: optimizer of the discriminator.
        scheduler: MONAI ``DDPMScheduler`` with the cDAL schedule (``make_cdal_scheduler``).
        attention_scale: index into ``discriminator.get_features`` used for the attention map (3 for MoNuSeg).
        r1_gamma: R1 weight gamma.
        lazy_reg: apply R1 every ``lazy_reg`` iterations (1: every iteration).
        epoch_length, non_blocking, prepare_batch, iteration_update, postprocessing, key_train_metric,
        additional_metrics, metric_cmp_fn, train_handlers, amp, event_names, event_to_attr, to_kwargs, amp_kwargs:
            as ``monai.engines.SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        scheduler: DDPMScheduler,
        attention_scale: int = 3,
        r1_gamma: float = 1.0,
        lazy_reg: int = 10,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        extra: dict[str, Any] = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=torch.device(device) if isinstance(device, str) else device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=as_bool(amp, "amp"),
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            **extra,
        )
        if lazy_reg < 1:
            raise ValueError(f"lazy_reg must be >= 1, got {lazy_reg}")
        self.generator = generator
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.diffusion = ForwardDiffusion(scheduler)
        self.attention_scale = attention_scale
        self.r1_gamma = r1_gamma
        self.lazy_reg = lazy_reg
        # ``network``/``optimizer`` are the names MONAI handlers look for (e.g. learning-rate logging)
        self.network = generator
        self.optimizer = g_optimizer

    def _random_index(self, batch: int) -> torch.Tensor:
        return torch.randint(0, self.diffusion.num_timesteps, (batch,), device=self.state.device)

    def _latent(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, int(unwrap_network(self.generator).nz), device=self.state.device)

    def _autocast(self) -> torch.autocast:
        """Mixed precision for the network forwards when ``amp`` is on (bf16 unless ``amp_kwargs`` says)."""
        kwargs = {"dtype": torch.bfloat16, **(self.amp_kwargs or {})}
        return torch.autocast(device_type=self.state.device.type, enabled=self.amp, **kwargs)

    def _discriminator_step(self, image: torch.Tensor, x0: torch.Tensor, iteration: int) -> dict[str, torch.Tensor]:
        gen, disc = self.generator, self.discriminator
        disc.requires_grad_(True)
        self.d_optimizer.zero_grad(set_to_none=True)
        index = self._random_index(x0.shape[0])
        x_t, x_next = self.diffusion.pair(x0, index)
        x_t.requires_grad_(True)
        with self._autocast():
            d_real = disc(x_t, index, x_next).view(-1)
            loss_real = F.softplus(-d_real).mean()
        r1 = torch.zeros((), device=x0.device)
        if iteration % self.lazy_reg == 0:
            (grad,) = torch.autograd.grad(d_real.float().sum(), x_t, create_graph=True)
            r1 = self.r1_gamma / 2 * grad.flatten(1).pow(2).sum(1).mean()
        with torch.no_grad():
            x0_hat = gen(x_next, index, self._latent(x0.shape[0]), image=image)
            x_pos = self.diffusion.posterior_sample(x0_hat.float(), x_next, index)
        with self._autocast():
            loss_fake = F.softplus(disc(x_pos, index, x_next)).mean()
        loss_d = loss_real + loss_fake + r1
        loss_d.backward()
        self.d_optimizer.step()
        return {"loss_d": loss_d.detach(), "loss_d_real": loss_real.detach(), "loss_d_fake": loss_fake.detach(),
                "r1": r1.detach()}

    def _generator_step(self, image: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        gen, disc = self.generator, self.discriminator
        disc.requires_grad_(False)
        self.g_optimizer.zero_grad(set_to_none=True)
        index = self._random_index(x0.shape[0])
        x_t, x_next = self.diffusion.pair(x0, index)
        with torch.no_grad():
            features = unwrap_network(disc).get_features(x_t, index, x_next)[self.attention_scale]
            attention = attention_map(features.float(), x0.shape[2:])
            _, x_next_att = self.diffusion.pair(attention * x0, index)
        with self._autocast():
            x0_hat = gen(x_next_att, index, self._latent(x0.shape[0]), image=image)
        loss_g = (x0 - x0_hat.float()).pow(2).flatten(1).mean(1).mean()
        loss_g.backward()
        self.g_optimizer.step()
        return loss_g.detach()

    def _iteration(self, engine: CDALTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        prepared = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image, x0 = prepared[0], prepared[1]
        image, x0 = torch.as_tensor(image).float(), torch.as_tensor(x0).float()
        engine.generator.train()
        engine.discriminator.train()
        out: dict[str, Any] = {CommonKeys.IMAGE: image, CommonKeys.LABEL: x0}
        out.update(engine._discriminator_step(image, x0, engine.state.iteration))
        out["loss_g"] = engine._generator_step(image, x0)
        out[CommonKeys.LOSS] = out["loss_g"]
        engine.state.output = out
        return out
