"""Datasets turned into conversations, each with its evaluate(): ARC, MMLU, GSM8K, HumanEval, SmolTalk, ChitChat
(the local mirror's chat stand-in: SmolTalk's class on another dataset, tasks/smoltalk.py) and CustomJSON (your
own JSONL), plus TaskMixture / TaskSequence in tasks/common.py. No tensors, no devices. Tests: tests/test_tasks.py."""
