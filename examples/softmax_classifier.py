"""A two-layer softmax classifier on three interleaved spirals."""
import fastnn as fn
from fastnn.data import spirals, train_test_split

fn.manual_seed(0)
X, y = spirals(n_samples=900, n_classes=3, noise=0.05, seed=0)
X_train, X_test, y_train, y_test = train_test_split(X, y, seed=0)
model = fn.Sequential(fn.Linear(2, 64), fn.ReLU(), fn.Linear(64, 3))
opt = fn.Adam(model.parameters(), lr=0.01)
history = fn.fit(model, fn.CrossEntropyLoss(), opt, X_train, y_train, epochs=200,
                 batch_size=32, validation_data=(X_test, y_test), progress=False)

probs = fn.functional.softmax(fn.asarray(fn.predict(model, X_test)))
accuracy = (fn.to_numpy(probs).argmax(axis=1) == y_test).mean()
print(f"test accuracy {accuracy:.3f}, validation loss {history.val_loss[-1]:.3f}")
