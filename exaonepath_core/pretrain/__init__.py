"""DINO pretraining: multi-crop, head, loss, schedules, the train loop and its launchers."""
