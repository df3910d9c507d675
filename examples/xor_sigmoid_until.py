"""XOR with sigmoids, trained *until* the error is small: the loop stops."""
import fastnn as fn
from fastnn.data import xor

fn.manual_seed(0)
X, y = xor()
model = fn.Sequential(fn.Linear(2, 4), fn.Sigmoid(), fn.Linear(4, 1), fn.Sigmoid())
opt = fn.SGD(model.parameters(), lr=2.0, momentum=0.9)


def small_error(history):
    # Sum of squared errors over the 4 points below 0.3 (mean * 4).
    return history.loss[-1] * len(X) < 0.3


history = fn.fit(model, fn.MSELoss(), opt, X, y, epochs=5000, batch_size=4,
                 stop_when=small_error, progress=False)
print(f"stopped after {history.epochs_run} epochs, squared error {history.loss[-1] * 4:.3f}")
print("predictions:", fn.predict(model, X).ravel().round(3))
