"""Ghost Attention (Llama 2 sec. 3.3): ``python -m rlhf.gatt {build,train,eval} ...``.

- ``cli.py``: the three commands;        ``task.py``: ``[gatt]`` section, config reader and the loop task;
- ``data.py``: building GAtt dialogues, loss masks, the training dataset and loader;
- ``evaluate.py``: adherence per turn;   ``instructions.py``: the instruction sampler and its checkers.
"""
