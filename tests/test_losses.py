import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.train.losses import sigmoid_loss, softmax_loss


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_softmax_loss(zimg, ztxt, scale, bias):
    logits = scale * zimg @ ztxt.T + bias
    loss = 0.0
    for mat in (logits, logits.T):
        for i, row in enumerate(mat):
            m = row.max()
            loss += -(row[i] - (m + np.log(np.exp(row - m).sum()))) / len(mat)
    return loss / 2


def numpy_sigmoid_loss(zimg, ztxt, scale, bias):
    logits = scale * zimg @ ztxt.T + bias
    total = 0.0
    for i in range(len(logits)):
        for j in range(len(logits)):
            label = 1.0 if i == j else -1.0
            total += np.log1p(np.exp(-label * logits[i, j]))
    return total / len(logits)


@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (10.0, -2.0)])
def test_losses_match_numpy_reference(n, scale, bias):
    rng = np.random.default_rng(n)
    zimg, ztxt = unit_rows(rng, n, 8), unit_rows(rng, n, 8)
    args = (jnp.asarray(zimg), jnp.asarray(ztxt), jnp.float32(scale), jnp.float32(bias))
    np.testing.assert_allclose(softmax_loss(*args)[0], numpy_softmax_loss(zimg, ztxt, scale,
                                                                          bias), rtol=1e-5)
    np.testing.assert_allclose(sigmoid_loss(*args)[0], numpy_sigmoid_loss(zimg, ztxt, scale,
                                                                          bias), rtol=1e-5)


def test_loss_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    zimg, ztxt = jnp.asarray(unit_rows(rng, 4, 3)), jnp.asarray(unit_rows(rng, 4, 3))
    for fn in (softmax_loss, sigmoid_loss):
        grad_t = jax.grad(lambda t, f=fn: f(zimg, ztxt, jnp.exp(t), 0.0)[0])(jnp.float32(1.0))
        eps = 1e-3
        fd = (fn(zimg, ztxt, np.exp(1 + eps), 0.0)[0] - fn(zimg, ztxt, np.exp(1 - eps),
                                                           0.0)[0]) / (2 * eps)
        np.testing.assert_allclose(grad_t, fd, rtol=1e-2)


def test_in_batch_top1_counts_correct_matches():
    z = jnp.eye(4)
    ztxt = z.at[3].set(z[2])  # caption 3 looks like image 2
    _, metrics = softmax_loss(z, ztxt, jnp.float32(10.0), 0.0)
    assert float(metrics["i2t_top1"]) == pytest.approx(0.75)
    assert float(metrics["t2i_top1"]) == pytest.approx(0.75)


def test_perfect_alignment_gives_low_loss():
    z = jnp.eye(8)
    low, _ = softmax_loss(z, z, jnp.float32(100.0), 0.0)
    high, _ = softmax_loss(z, z[::-1], jnp.float32(100.0), 0.0)
    assert float(low) < 1e-3 < float(high)
