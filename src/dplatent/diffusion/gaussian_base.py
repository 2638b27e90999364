"""A DP class-conditional Gaussian in latent space, and the exact denoiser it implies.

Release (one Gaussian mechanism on the private latents, recorded in the ledger as stage
`latent_gaussian`: sample rate 1, one step):
  every latent is scaled to L2 norm at most R = sqrt(D - 1) (the encoder's per-example
  standardisation already gives exactly R; the bound makes the sensitivity hold whatever the
  encoder does), and contributes, to its own class c only,
      w_1 z / R          to the class's first-moment sum,
      w_2                to the class's count,
      w_3 z z^T / R^2    to the class's second-moment sum (Frobenius norm <= w_3),
  with weights (w_1, w_2, w_3), w_1^2 + w_2^2 + w_3^2 = 1 (RELEASE_WEIGHTS, chosen by
  `release(weights=)`). Adding or removing one record changes the concatenation of all
  these sums by an L2 norm of at most SENSITIVITY = 1, and Gaussian noise of std sigma is
  added to every coordinate. Everything after that (dividing the parts by their weights,
  means, covariances, projection onto positive semi-definite matrices) is post-processing.
  The noise on part k is sigma / w_k. 'equal' gives each part sqrt(3) sigma. 'weighted'
  puts the budget where the noise hurts: the covariances need the most accuracy, since
  their noise spreads over D^2 entries, and get 1.05 sigma; a mean needs less (its noise,
  sigma R / (w_1 count) per coordinate, is 0.003-0.005 for MNIST's classes at epsilon = 10
  with 98-196-d latents), and a count of thousands hardly any.

Covariances from the noisy sums (post-processing, `covariance=`):
  'psd'      the noisy covariance projected onto PSD matrices (eigenvalues >= EIG_FLOOR).
  'denoised' uses the noise's std, which is public: the noise on a class covariance is a
             symmetric Gaussian matrix whose eigenvalues fill [-edge, edge], so an eigenvalue
             inside that band says nothing about its direction. Eigenvalues above the edge are
             debiased as spikes of a Wigner matrix (observed = true + v D / true); every other
             direction gets the variance the trace leaves over (the trace is unbiased). With
             'psd', those directions collapse to the floor although the data vary there.
  'pooled_bulk' as 'denoised', but the directions below a group's noise edge share the
             trace's rest in the shape of the pooled bulk (the count-weighted mean of every
             group's covariance less its own spikes, about sqrt(groups) less noisy than one
             group's) instead of equally: the small directions keep the spread the pooled
             estimate sees among them.

Second moments in a public basis (`release(basis=)`, diffusion.gaussian_basis = K > 0): each
record adds w_3 (B^T u)(B^T u)^T instead of w_3 u u^T, B [D, K] orthonormal (the sensitivity
stays 1), so K^2 entries carry noise instead of D^2 and the noise edge of a class covariance
shrinks by sqrt(K / D). B must not depend on the private data: `decoder_basis` takes it from
the DP-trained decoder (the K latent directions its images change most along). Outside B a
class gets one variance, what its total leaves after B's share: every latent has norm R (the
encoder standardises each one), so a class's total variance is R^2 - |mean|^2, from the
released mean (`embedded`). Cross-covariances between B and the rest are taken as zero.

Per-class mixtures (`release_partitioned`, diffusion.gaussian_partition = B > 0): one Gaussian
per class misses the shape of a class (MNIST's sevens with and without a bar). Two releases:
  A (noise sigma_A) of the class sums as above; post-processing gives each class's mean and its
    top B principal directions, which are public from then on;
  B (noise sigma_B) of the same sums with every record counted in its cell instead of its
    class: the cell is the sign pattern of (z - mean_c) along class c's B directions, so
    2^B cells per class and each record in exactly one. Given A's output the sums of B have
    sensitivity 1 as before.
Both are Gaussian mechanisms of sensitivity 1 on all records, so together they are exactly one
Gaussian mechanism with 1/sigma^2 = 1/sigma_A^2 + 1/sigma_B^2 (their Renyi divergences add):
the plan (privacy/accounting.py) calibrates sigma for the release and gives A the share
privacy.partition_share of that precision; the ledger records both. Each cell gets a Gaussian,
and within its class the weight of its released count.

Use: `GaussianBase` is the exact v- (or epsilon-) predictor for data drawn from N(mu_y, S_y)
(or, with cells, from the mixture of class y's cells).
The denoiser adds its learned output to it (models/denoiser.py), so DP-SGD starts from the DP
Gaussian model and only learns what the Gaussian misses (a warm start in the spirit of
DP-FETA, which warms up on noisy statistics of the private data). The null label of
classifier-free guidance gets the moment-matched Gaussian of the balanced class mixture.
Measured on MNIST (BENCHMARKS.md): these Gaussians alone, decoded, already give downstream
accuracy close to the autoencoder's ceiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dplatent.config import GAUSSIAN_COVARIANCES, GAUSSIAN_RELEASES

# weights of (first moment, count, second moment), one set per GAUSSIAN_RELEASES name; each
# set has unit norm
RELEASE_WEIGHTS = {"equal": (1 / math.sqrt(3),) * 3,
                   "weighted": (0.3, 0.1, math.sqrt(1 - 0.3 ** 2 - 0.1 ** 2))}
SENSITIVITY = 1.0   # L2 sensitivity of the weighted sums under add/remove
EIG_FLOOR = 1e-3    # covariance eigenvalues are clipped to at least this


@dataclass(frozen=True)
class NoisySums:
    """The released (noisy) sums, per class: first moment [C, D], count [C], second
    moment [C, D, D], all weighted and normalised as in the module docstring."""

    first: torch.Tensor
    count: torch.Tensor
    second: torch.Tensor
    radius: float
    weights: tuple[float, float, float]
    noise_std: float = 0.0   # std of the noise added to every coordinate
    # [D, K] orthonormal public basis the second moments were taken in ([C, K, K]); None: the
    # whole latent space ([C, D, D])
    basis: torch.Tensor | None = None


def bound_norm(z: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each row down to L2 norm <= radius (rows already inside are unchanged)."""
    norms = z.norm(dim=1, keepdim=True)
    return z * torch.clamp(radius / norms.clamp_min(1e-12), max=1.0)


def class_sums(z: torch.Tensor, y: torch.Tensor, num_classes: int, radius: float,
               weights: tuple[float, float, float],
               basis: torch.Tensor | None = None) -> NoisySums:
    """Exact weighted, normalised sums per class (private: never returned outside
    `release`). With a basis B [D, K], the second moments are those of B^T u (Frobenius norm
    still <= w_3 per record, since B is orthonormal)."""
    w_first, w_count, w_second = weights
    u = bound_norm(z.double(), radius) / radius
    onehot = torch.nn.functional.one_hot(y.long(), num_classes).double()
    v = u if basis is None else u @ basis.double()
    second = torch.stack([v[y == c].T @ v[y == c] for c in range(num_classes)])
    return NoisySums(first=w_first * (onehot.T @ u), count=w_count * onehot.sum(0),
                     second=w_second * second, radius=radius, weights=weights,
                     basis=None if basis is None else basis.double())


def add_noise(sums: NoisySums, noise_multiplier: float,
              generator: torch.Generator) -> NoisySums:
    """The Gaussian mechanism: std noise_multiplier * SENSITIVITY on every coordinate."""
    std = noise_multiplier * SENSITIVITY

    def noisy(t: torch.Tensor) -> torch.Tensor:
        return t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype)

    return NoisySums(first=noisy(sums.first), count=noisy(sums.count),
                     second=noisy(sums.second), radius=sums.radius, weights=sums.weights,
                     noise_std=std, basis=sums.basis)


def release(z: torch.Tensor, y: torch.Tensor, num_classes: int, noise_multiplier: float,
            generator: torch.Generator, weights: str = "equal",
            basis: torch.Tensor | None = None) -> NoisySums:
    """The only function here that reads private data: latents [N, D] and labels [N] ->
    the noisy sums. `basis`: a public orthonormal [D, K] (`decoder_basis`) in which the
    second moments are released. The caller records the ledger event (privacy/accounting.py)."""
    radius = math.sqrt(max(z.shape[1] - 1, 1))
    if weights not in GAUSSIAN_RELEASES:
        raise ValueError(f"weights must be one of {GAUSSIAN_RELEASES}, got {weights!r}")
    if basis is not None and (basis.ndim != 2 or basis.shape[0] != z.shape[1]
                              or not 0 < basis.shape[1] < z.shape[1]):
        raise ValueError(f"a basis for {z.shape[1]}-d latents must be [{z.shape[1]}, K] with "
                         f"0 < K < {z.shape[1]}, got {list(basis.shape)}")
    sums = class_sums(z.cpu(), y.cpu(), num_classes, radius, RELEASE_WEIGHTS[weights],
                      None if basis is None else basis.cpu())
    return add_noise(sums, noise_multiplier, generator)


def decoder_basis(decode: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor,
                  rank: int) -> torch.Tensor:
    """[D, rank]: the top `rank` eigenvectors of the mean of J^T J over `points` [P, D], J the
    Jacobian of `decode` (a flat latent [D] -> a flat image) at each point: the latent
    directions along which the decoder's images change most. A function of the DP-trained
    decoder and of public points only (post-processing), so a release may use it freely.
    Each vector's sign is fixed (its largest entry in size is positive), so that nearly equal
    decoders, e.g. those of one run trained by one process or by several, give nearly equal
    bases: the release's noise is drawn in the basis' coordinates."""
    d = points.shape[1]
    if not 0 < rank < d:
        raise ValueError(f"the basis rank must be in (0, {d}), got {rank}")
    gram = torch.zeros(d, d, dtype=torch.float64)
    for point in points:
        jac = torch.autograd.functional.jacobian(decode, point, vectorize=True,
                                                 strategy="forward-mode").detach().double()
        gram += jac.T @ jac
    basis = torch.linalg.eigh(gram / len(points))[1][:, d - rank:]
    peaks = basis.gather(0, basis.abs().argmax(0, keepdim=True))
    return basis * torch.sign(peaks)


def release_partitioned(z: torch.Tensor, y: torch.Tensor, num_classes: int, directions: int,
                        noise_multipliers: tuple[float, float], generator: torch.Generator,
                        weights: str = "equal", covariance: str = "psd",
                        basis: torch.Tensor | None = None
                        ) -> tuple[NoisySums, torch.Tensor, torch.Tensor]:
    """The two releases of the per-class mixtures (module docstring): release A with
    noise_multipliers[0] -> the public partition (`partition`); release B with
    noise_multipliers[1] of the cells' sums, cell c * 2^B + k for cell k of class c. Returns
    B's sums and the partition (centres [C, D], directions [C, D, B]). The caller records both
    ledger events."""
    sums_a = release(z, y, num_classes, noise_multipliers[0], generator, weights, basis)
    centres, dirs = partition(sums_a, covariance, directions)
    cells = y.cpu().long() * 2 ** directions + cell_of(z.cpu(), y.cpu(), centres, dirs)
    sums = release(z, cells, num_classes * 2 ** directions, noise_multipliers[1], generator,
                   weights, basis)
    return sums, centres, dirs


def partition(sums: NoisySums, covariance: str, directions: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-processing of a class release: each class's mean [C, D] and its top `directions`
    principal directions [C, D, B] (eigenvectors of the estimated covariance, largest last)."""
    means, covs = gaussians(sums, covariance)
    num_classes = len(means) - 1
    evecs = torch.linalg.eigh(covs[:num_classes])[1]
    return means[:num_classes], evecs[:, :, evecs.shape[-1] - directions:]


def cell_of(z: torch.Tensor, y: torch.Tensor, centres: torch.Tensor,
            directions: torch.Tensor) -> torch.Tensor:
    """[N]: each latent's cell within its class, sum_b 2^b [(z - centre_y) . direction_yb > 0]."""
    proj = torch.einsum("nd,ndb->nb", z.to(centres.dtype) - centres[y],
                        directions[y].to(centres.dtype))
    return ((proj > 0).long() * 2 ** torch.arange(directions.shape[-1])).sum(1)


def cell_weights(sums: NoisySums, cells_per_class: int) -> torch.Tensor:
    """[C, K]: each cell's share of its class, from the released counts (rows sum to 1)."""
    counts = class_counts(sums).view(-1, cells_per_class)
    return counts / counts.sum(1, keepdim=True)


def gaussians(sums: NoisySums, covariance: str = "psd",
              cells_per_class: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-processing: means [M+1, D] and PSD covariances [M+1, D, D] in latent units, one
    row per released group (M = C classes, or C * K cells, K = cells_per_class, class c's
    cells in rows c K .. c K + K - 1); row M is the moment-matched Gaussian of the balanced
    class mixture (the null label), cells weighted by `cell_weights`. `covariance`: how the
    covariances are estimated (module docstring)."""
    if covariance not in GAUSSIAN_COVARIANCES:
        raise ValueError(f"covariance must be one of {GAUSSIAN_COVARIANCES}, "
                         f"got {covariance!r}")
    w_second = sums.weights[2]
    r = sums.radius
    count = class_counts(sums)[:, None]
    means = group_means(sums)
    second = sums.second / w_second / count[..., None] * r * r
    second = (second + second.transpose(1, 2)) / 2
    basis = sums.basis
    projected = means if basis is None else means @ basis
    raw = second - torch.einsum("ci,cj->cij", projected, projected)
    if covariance == "psd":
        covs = psd(raw)
    elif covariance == "denoised":
        covs = denoised(raw, covariance_noise_std(sums))
    else:
        covs = pooled_bulk(raw, covariance_noise_std(sums), count[:, 0])
    if basis is not None:
        covs = embedded(covs, raw, basis, (r * r - (means ** 2).sum(1)))
    share = (cell_weights(sums, cells_per_class) / (len(means) // cells_per_class)).flatten()
    mix_mean = share @ means
    mix_second = torch.einsum("m,mij->ij", share,
                              covs + torch.einsum("ci,cj->cij", means, means))
    mix_cov = psd(mix_second - torch.outer(mix_mean, mix_mean))
    return torch.cat([means, mix_mean[None]]), torch.cat([covs, mix_cov[None]])


def embedded(covs: torch.Tensor, raw: torch.Tensor, basis: torch.Tensor,
             trace: torch.Tensor) -> torch.Tensor:
    """Covariances [C, D, D] from estimates in a basis B [D, K] (`covs`, from the noisy
    `raw` [C, K, K]): B covs B^T, and in the D - K directions outside B an equal share of what
    the groups' total variances `trace` [C] leave after B's (raw, unbiased) trace, at least
    EIG_FLOOR. The totals are public when every latent has norm R, as the encoder's per-example
    standardisation makes them: the trace of a group's covariance is then R^2 - |mean|^2."""
    d, k = basis.shape
    outside = (trace - torch.diagonal(raw, dim1=-2, dim2=-1).sum(-1)) / (d - k)
    rest = torch.eye(d, dtype=basis.dtype) - basis @ basis.T
    return (basis @ covs @ basis.T
            + outside.clamp_min(EIG_FLOOR)[:, None, None] * rest)


def group_means(sums: NoisySums) -> torch.Tensor:
    """[M, D]: each released group's mean in latent units, from its first moment and count."""
    return sums.first / sums.weights[0] / class_counts(sums)[:, None] * sums.radius


def class_counts(sums: NoisySums) -> torch.Tensor:
    """[C]: the released (noisy) record count of each class, at least 1."""
    return (sums.count / sums.weights[1]).clamp_min(1.0)


def covariance_noise_std(sums: NoisySums) -> torch.Tensor:
    """[C]: std of the release's noise on each entry of a class covariance (before
    symmetrising), in latent units: sigma R^2 / (w_3 count)."""
    return sums.noise_std / sums.weights[2] * sums.radius ** 2 / class_counts(sums)


def spikes(raw: torch.Tensor, entry_std: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eigen-analysis behind 'denoised' and 'pooled_bulk': `entry_std` [C] is the std of
    the noise on each entry before symmetrising, so off-diagonal noise has variance
    v = std^2 / 2 and the noise's eigenvalues fill [-2 sqrt(v D), 2 sqrt(v D)] (semicircle
    law; the largest one fluctuates by about D^(-2/3) of that edge, so the edge is taken
    2 D^(-2/3) higher). An eigenvalue l above the edge is a spike of true size
    (l + sqrt(l^2 - 4 v D)) / 2. Returns the observed eigenvalues [C, D] and eigenvectors
    [C, D, D], each direction's spike size (0 where it is not one) [C, D], and the variance
    the trace leaves to the other directions in all [C] (the trace is unbiased)."""
    d = raw.shape[-1]
    vd = (entry_std.to(raw.dtype) ** 2 / 2 * d)[:, None]
    evals, evecs = torch.linalg.eigh(raw)
    spike = evals > 2 * vd.sqrt() * (1 + 2 * d ** (-2 / 3))
    true = (evals + (evals ** 2 - 4 * vd).clamp_min(0).sqrt()) / 2
    kept = torch.where(spike, true, torch.zeros_like(true))
    left = torch.diagonal(raw, dim1=-2, dim2=-1).sum(-1) - kept.sum(-1)
    return evals, evecs, kept, left


def denoised(raw: torch.Tensor, entry_std: torch.Tensor) -> torch.Tensor:
    """Covariances [C, D, D] from noisy symmetric ones (`spikes`): the spikes, debiased, and
    every other direction an equal share of the variance the trace leaves (at least
    EIG_FLOOR). The noise on the means' outer product (std ~ sigma R / (w_1 count)) is
    ignored."""
    _, evecs, kept, left = spikes(raw, entry_std)
    rest = left / ((kept == 0).sum(-1)).clamp_min(1)
    evals = torch.where(kept > 0, kept, rest[:, None]).clamp_min(EIG_FLOOR)
    return evecs @ torch.diag_embed(evals) @ evecs.transpose(-1, -2)


def pooled_bulk(raw: torch.Tensor, entry_std: torch.Tensor, count: torch.Tensor
                ) -> torch.Tensor:
    """Covariances [C, D, D] like 'denoised', except that the directions below the noise edge
    share the variance the trace leaves in the shape of the pooled bulk instead of equally.
    The pooled bulk is the count-weighted mean over the C groups of each noisy covariance
    less its own spikes (as observed), so its noise std is sqrt(sum_c (count_c / n)^2
    std_c^2), about sqrt(C) smaller than one group's; it is itself 'denoised'. For group c
    with spike directions U_c, the bulk is Q_c P Q_c (Q_c = I - U_c U_c^T, P the pooled
    estimate) scaled to the trace left. One group's noise edge hides its small directions;
    the pooled bulk still shows how the variance spreads among them."""
    evals, evecs, kept, left = spikes(raw, entry_std)
    u = evecs * (kept > 0)[:, None, :]              # spike directions, zero columns elsewhere
    residual = raw - u @ torch.diag_embed(evals) @ u.transpose(-1, -2)
    w = (count / count.sum()).to(raw.dtype)
    pooled_std = (w ** 2 * entry_std.to(raw.dtype) ** 2).sum().sqrt()
    shape = denoised(torch.einsum("c,cij->ij", w, residual)[None], pooled_std[None])[0]
    q = torch.eye(raw.shape[-1], dtype=raw.dtype) - u @ u.transpose(-1, -2)
    bulk = q @ shape @ q
    scale = left.clamp_min(0) / torch.diagonal(bulk, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12)
    return psd(u @ torch.diag_embed(kept) @ u.transpose(-1, -2) + scale[:, None, None] * bulk)


def psd(m: torch.Tensor) -> torch.Tensor:
    """Nearest symmetric matrix with eigenvalues >= EIG_FLOOR (batched)."""
    evals, evecs = torch.linalg.eigh((m + m.transpose(-1, -2)) / 2)
    return evecs @ torch.diag_embed(evals.clamp_min(EIG_FLOOR)) @ evecs.transpose(-1, -2)


class GaussianBase(nn.Module):
    """Exact denoiser for z0 ~ N(mu_y, S_y) under z_t = sqrt(a) z0 + sqrt(1 - a) eps:
    E[z0 | z_t] = mu + sqrt(a) S (a S + (1 - a) I)^-1 (z_t - sqrt(a) mu), computed in S's
    eigenbasis. With K = cells_per_class > 1, class y is the mixture of its K cells' Gaussians
    with weights w_yk, and E[z0 | z_t, y] = sum_k p(k | z_t, y) E[z0 | z_t, k], where
    p(k | z_t, y) is proportional to w_yk N(z_t; sqrt(a) mu_k, a S_k + (1 - a) I). The null
    label is one Gaussian (row C K). Buffers only: nothing here is trained."""

    def __init__(self, *, num_classes: int, dim: int, alphas_cumprod: torch.Tensor,
                 prediction: str, cells_per_class: int = 1):
        super().__init__()
        self.prediction = prediction
        self.num_classes, self.cells = num_classes, cells_per_class
        groups = num_classes * cells_per_class + 1
        self.register_buffer("means", torch.zeros(groups, dim))
        self.register_buffer("evals", torch.ones(groups, dim))
        self.register_buffer("evecs", torch.eye(dim).repeat(groups, 1, 1))
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone())
        if cells_per_class > 1:  # runs without cells keep their state dict as it was
            self.register_buffer("log_cell_weights", torch.full(
                (num_classes, cells_per_class), -math.log(cells_per_class)))

    @torch.no_grad()
    def set_gaussians(self, means: torch.Tensor, covs: torch.Tensor,
                      cell_weights: torch.Tensor | None = None) -> None:
        """means [C K + 1, D], covs [C K + 1, D, D] (`gaussians`); cell_weights [C, K]
        (`cell_weights`), needed when K > 1."""
        evals, evecs = torch.linalg.eigh(covs.double())
        self.means.copy_(means)
        self.evals.copy_(evals.clamp_min(EIG_FLOOR))
        self.evecs.copy_(evecs)
        if self.cells > 1:
            if cell_weights is None:
                raise ValueError("a base with cells needs the cells' weights")
            self.log_cell_weights.copy_(cell_weights.clamp_min(1e-12).log())

    def denoised(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E[z0 | z_t, y]; z: [..., D], t and y: [...]. The eigenbasis changes run per group
        (at most C K + 1 matrix products) instead of gathering a D x D matrix per example;
        the cells' posterior weights are accumulated one cell at a time (log-sum-exp)."""
        shape = z.shape
        z, t, y = z.reshape(-1, shape[-1]), t.reshape(-1), y.reshape(-1)
        a = self.alphas_cumprod[t].unsqueeze(-1)
        null = y == self.num_classes
        group = torch.where(null, len(self.means) - 1, y * self.cells)
        if self.cells == 1:
            return self._component(z, a, group)[0].reshape(shape)  # no likelihoods needed
        best = torch.full_like(a, -math.inf)
        total, acc = torch.zeros_like(a), torch.zeros_like(z)
        for k in range(self.cells):
            rows = torch.arange(len(z), device=z.device) if k == 0 else (~null).nonzero()[:, 0]
            mean, u, var = self._component(z[rows], a[rows], group[rows] + k * ~null[rows])
            loglik = -0.5 * ((u * u / var) + var.log()).sum(-1)  # log N(z_t; ...) + const
            logw = self.log_cell_weights[y[rows].clamp(max=self.num_classes - 1), k]
            score = (loglik + torch.where(null[rows], 0.0, logw)).unsqueeze(-1)
            top = torch.maximum(best[rows], score)
            old, new = (best[rows] - top).exp(), (score - top).exp()
            best[rows], total[rows] = top, total[rows] * old + new
            acc[rows] = acc[rows] * old + new * mean
        return (acc / total).reshape(shape)

    def _component(self, z: torch.Tensor, a: torch.Tensor, group: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For z_t [N, D] and each row's Gaussian `group`: E[z0 | z_t] [N, D], and z_t's
        coordinates u in the group's eigenbasis (centred) with their variances var, so that
        N(z_t; sqrt(a) mu, a S + (1 - a) I) is the product of N(u_i; 0, var_i)."""
        mu, lam = self.means[group], self.evals[group]
        u = self._per_group(z - a.sqrt() * mu, group, transpose=False)
        var = a * lam + 1 - a
        mean = mu + self._per_group(u * (a.sqrt() * lam / var), group, transpose=True)
        return mean, u, var

    def _per_group(self, v: torch.Tensor, group: torch.Tensor, transpose: bool) -> torch.Tensor:
        """Row i of v times evecs[group_i] (into the eigenbasis) or its transpose (back out)."""
        out = torch.empty_like(v)
        for g in torch.unique(group).tolist():
            rows = (group == g).nonzero(as_tuple=True)[0]
            vec = self.evecs[g]
            out[rows] = v[rows] @ (vec.T if transpose else vec)
        return out

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].unsqueeze(-1)
        z0 = self.denoised(z, t, y)
        eps = (z - a.sqrt() * z0) / (1 - a).sqrt()
        return eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0
