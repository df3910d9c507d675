"""XOR with a ReLU hidden layer, Adam and MSE: the classic first network."""
import fastnn as fn
from fastnn.data import xor

fn.manual_seed(1)
X, y = xor()
model = fn.Sequential(fn.Linear(2, 8), fn.ReLU(), fn.Linear(8, 1))
opt = fn.Adam(model.parameters(), lr=0.05)
history = fn.fit(model, fn.MSELoss(), opt, X, y, epochs=300, batch_size=4, progress=False)

pred = fn.predict(model, X)
for inputs, p in zip(X, pred):
    print(f"{inputs.astype(int)} -> {p[0]:.3f}")
print(f"final loss {history.loss[-1]:.5f}; learned XOR: {bool(((pred > 0.5) == (y > 0.5)).all())}")
