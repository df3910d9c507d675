"""Linear regression by gradient descent: recovers the true weights."""
import fastnn as fn
from fastnn.data import noisy_linear

fn.manual_seed(0)
X, y, true_w, true_b = noisy_linear(n_samples=500, n_features=3, noise=0.05, seed=0)
model = fn.Linear(3, 1, init="zeros")
opt = fn.SGD(model.parameters(), lr=0.1)
history = fn.fit(model, fn.MSELoss(), opt, X, y, epochs=100, batch_size=50, progress=False)

print("true weights   ", true_w.ravel().round(3), "bias", true_b.round(3))
print("learned weights", fn.to_numpy(model.weight.data).ravel().round(3),
      "bias", fn.to_numpy(model.bias.data).round(3))
print(f"final loss {history.loss[-1]:.5f} (noise variance {0.05 ** 2:.5f})")
