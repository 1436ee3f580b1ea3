"""The model catalog: the weights store (`weights`: one folder and manifest per model id), the
model tables as data (`known`) and model loads (`loader`: fetch, then the engine side's prepare
step, passed in). May import net and models; never torch or the engine."""
