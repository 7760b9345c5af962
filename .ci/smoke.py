"""Smoke test of an installed wheel: import, step, compare with torch.optim."""

import torch

import ferrotorch
from ferrotorch import optim

print("ferrotorch", ferrotorch.__version__, "from", ferrotorch.__file__, "torch", torch.__version__)
torch.manual_seed(0)
model = torch.nn.Linear(16, 4)
twin = torch.nn.Linear(16, 4)
twin.load_state_dict(model.state_dict())
ours = optim.AdamW(model.parameters(), lr=1e-2)
ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
x = torch.randn(32, 16)
for _ in range(20):
    for m, o in ((model, ours), (twin, ref)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
for a, b in zip(model.parameters(), twin.parameters()):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
ref.load_state_dict(ours.state_dict())
print("smoke test passed")
