"""The Hugging Face token: from a Colab secret or a hidden prompt, checked, kept in memory only."""

from __future__ import annotations

import getpass
import os
from typing import Callable

from ..errors import UserError
from ..hub import is_hub_id
from .console import say
from .drive import Environment

TOKEN_SECRET = "HF_TOKEN"


def login(env: Environment, model: str | None = None, *, token: str | None = None,
          prompt: Callable[[str], str] = getpass.getpass) -> None:
    """Make a Hugging Face token available to the pipeline, never echoing or saving it.

    The token comes from the Colab secret ``HF_TOKEN`` or a hidden prompt, is checked against the
    Hub (and against ``model``'s gate, e.g. FLUX.1-dev's licence) and is put in this process's
    environment only, where the ``dvc`` child processes inherit it. Nothing is written to disk
    (``huggingface_hub.login`` would store it under ~/.cache). Skipped in local test mode.
    """
    if env.local_test:
        say("local test mode: no Hugging Face login")
        return
    token = (token or _colab_secret(TOKEN_SECRET)
             or prompt("Hugging Face token (input hidden; add a Colab secret HF_TOKEN to skip this): "))
    token = (token or "").strip()
    if not token:
        raise UserError("no Hugging Face token: add a Colab secret named HF_TOKEN (key icon on the "
                        "left) with a token that has accepted the FLUX.1-dev licence, or paste one")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    api = HfApi()
    try:
        user = api.whoami(token=token)["name"]
    except Exception as err:  # never format the exception: some echo request headers
        raise UserError(f"the Hugging Face Hub refused this token or cannot be reached "
                        f"({type(err).__name__}); create a read token at "
                        "https://huggingface.co/settings/tokens") from None
    if model and is_hub_id(model):
        try:
            api.auth_check(model, token=token)
        except (GatedRepoError, RepositoryNotFoundError) as err:
            raise UserError(f"your token has no access to {model} ({type(err).__name__}); accept its "
                            f"licence at https://huggingface.co/{model} and run this cell again") from None
        except Exception as err:
            raise UserError(f"could not check access to {model} on the Hub ({type(err).__name__}); "
                            "check the network and run this cell again") from None
    os.environ["HF_TOKEN"] = token
    say(f"logged in to the Hugging Face Hub as {user} (the token stays in this runtime's memory)")


def _colab_secret(name: str) -> str | None:
    try:
        from google.colab import userdata

        return userdata.get(name)
    except Exception:  # no secret, access not granted, or not on Colab: fall back to the prompt
        return None
