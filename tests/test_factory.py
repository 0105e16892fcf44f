"""create_optimizer: every name trains, names are case-insensitive, unknown names are listed."""
import pytest

from adaprelora import available_optimizers, create_optimizer
from adaprelora.testing.lora_models import forward_backward, make_lora_model

LRS = {"adaprelora": 1e-2, "adaprelora-sgd": 5e-2, "adamw": 1e-2, "loraplus": 2e-3, "scaled-gd": 2e-2,
       "scaled-adamw": 1e-2, "lora-pro": 1e-2, "prodigy": 1.0, "adafactor": 1e-2, "schedule-free": 1e-2,
       "adamw8bit": 1e-2, "lora-rite": 1e-2}
STEPS = {"prodigy": 100}  # Prodigy grows its step size from d0 = 1e-6 first


def test_available_optimizers_lists_every_method():
    assert available_optimizers() == list(LRS)


@pytest.mark.parametrize("name", list(LRS))
@pytest.mark.slow
def test_every_optimizer_reduces_the_loss_of_a_small_lora_regression(name):
    # LoRA-RITE steps LoRA pairs only (a trainable norm is refused: test_user_optimizers)
    model = make_lora_model(seed=0, init_B_random=False, modules_to_save=None if name == "lora-rite" else ["norm"])
    opt = create_optimizer(name, model, lr=LRS[name])
    losses = []
    for _ in range(STEPS.get(name, 40)):
        losses.append(forward_backward(model, seed=0).item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.7 * losses[0], f"{name}: {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_names_are_case_insensitive_and_unknown_names_list_the_choices():
    model = make_lora_model()
    assert type(create_optimizer("AdaPreLoRA", model, lr=1e-3)).__name__ == "AdaPreLoRA"
    assert type(create_optimizer("Scaled_AdamW", model, lr=1e-3)).__name__ == "ScaledLoRA"
    with pytest.raises(ValueError, match="available: adaprelora, adaprelora-sgd, adamw"):
        create_optimizer("adafactorish", model, lr=1e-3)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        create_optimizer("adamw", model, lr=0)
    with pytest.raises(ValueError, match="unexpected keyword"):
        create_optimizer("lora-pro", model, lr=1e-3, loraplus_lr_ratio=4)


def test_loraplus_gives_B_the_ratio_times_the_learning_rate():
    model = make_lora_model()
    opt = create_optimizer("loraplus", model, lr=1e-3, loraplus_lr_ratio=8)
    by_lr = {g["lr"]: g["params"] for g in opt.param_groups}
    B_ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    assert {id(p) for p in by_lr[8e-3]} == B_ids
    assert not B_ids & {id(p) for p in by_lr[1e-3]}


def test_adaprelora_sgd_is_the_sgd_variant():
    opt = create_optimizer("adaprelora-sgd", make_lora_model(), lr=1e-3)
    assert opt.variant == "sgd"
    with pytest.raises(ValueError, match="variant='sgd'"):
        create_optimizer("adaprelora-sgd", make_lora_model(), lr=1e-3, variant="adamw")
