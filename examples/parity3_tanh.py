"""3-bit parity with tanh units (inputs coded as -1/+1, target in {-1, +1})."""
import fastnn as fn
from fastnn.data import parity

fn.manual_seed(0)
X, y = parity(3, signed=True)
target = 2 * y - 1  # parity 0/1 -> -1/+1, the range of tanh
model = fn.Sequential(fn.Linear(3, 8), fn.Tanh(), fn.Linear(8, 1), fn.Tanh())
opt = fn.Adam(model.parameters(), lr=0.03)
history = fn.fit(model, fn.MSELoss(), opt, X, target, epochs=400, batch_size=8, progress=False)

pred = fn.predict(model, X)
print("inputs    parity  prediction")
for bits, t, p in zip(X, y, pred):
    print(f"{bits.astype(int)}  {int(t[0])}       {p[0]:+.3f}")
print(f"all correct: {bool(((pred > 0) == (target > 0)).all())}, loss {history.loss[-1]:.4f}")
