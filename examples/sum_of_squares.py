"""Regression of y = sum(x_i^2) with a deep MLP."""
import fastnn as fn
from fastnn.data import sum_of_squares, train_test_split

fn.manual_seed(0)
X, y = sum_of_squares(n_samples=3000, n_features=4, seed=0)
X_train, X_test, y_train, y_test = train_test_split(X, y, seed=0, stratify=False)
model = fn.Sequential(
    fn.Linear(4, 64), fn.ReLU(),
    fn.Linear(64, 64), fn.ReLU(),
    fn.Linear(64, 64), fn.ReLU(),
    fn.Linear(64, 1),
)
opt = fn.Adam(model.parameters(), lr=3e-3)
history = fn.fit(model, fn.MSELoss(), opt, X_train, y_train, epochs=60, batch_size=64,
                 validation_data=(X_test, y_test), progress=False)
baseline = float(((y_test - y_train.mean()) ** 2).mean())
print(f"test MSE {history.val_loss[-1]:.5f} (predicting the mean gives {baseline:.4f})")
