import os

from hub import hub_handler  # type: ignore[import-not-found]  # Kiln's workers provide it

# Your own imports go here; files beside this one import by name (e.g. `import utils`).

# MODEL_DIR is the path of the project's model/ folder: load your model and
# other large files from it here, once, not inside the handler.
MODEL_DIR = os.getenv("MODEL_DIR")


@hub_handler
def inference_handler(inputs, _):
    """The main inference function which gets triggered when the API is invoked"""
    # `inputs` is the request's JSON body (a string, list, dict, ...).
    # Replace this echo with your model's prediction.
    output = inputs

    # The caller receives {"statusCode": 200, "body": {"output": output}}.
    return output
