"""Watch your own training loop: a deep sigmoid net on scikit-learn's breast-cancer data.

    python examples/sigmoid_breast_cancer.py

Prints, per layer, the back-propagated gradient ‖∂L/∂a‖ and the weight
gradient at the last sampled step; the sigmoid's derivative (≤ 1/4) makes
both fall by orders of magnitude towards the input.
"""

import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

import gradwatch as gw

torch.manual_seed(0)
data = load_breast_cancer()
x = torch.tensor(data.data, dtype=torch.float32)
x = (x - x.mean(0)) / x.std(0)
y = torch.tensor(data.target, dtype=torch.float32)

layers = [nn.Linear(30, 32), nn.Sigmoid()]
for _ in range(6):
    layers += [nn.Linear(32, 32), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

with gw.watch(model, optimizer, name="sigmoid-breast-cancer", overwrite=True) as watch:
    for step in range(200):
        idx = torch.randint(0, len(x), (64,))
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx]).squeeze(1), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        watch.log(loss=loss)

run = gw.open_run(watch.path)
back, grad = run.series("out_grad_norm"), run.series("grad_norm")
print(f"{'layer':>6} {'‖∂L/∂a‖':>10} {'‖∂L/∂W‖':>10}")
for name in run.layers:
    i, j = back.names.index(name), grad.names.index(name)
    print(f"{name:>6} {back.values[i, -1]:10.2e} {grad.values[j, -1]:10.2e}")
ratio = back.values[0, -1] / back.values[-1, -1]
print(f"first/last layer back-propagated gradient: {ratio:.1e}; store: {watch.path}")
