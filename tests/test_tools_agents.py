"""The openai-agents package's chat-completions tool loop against the real stack: the model
calls a function tool, gets its result back, and answers in plain text, without echoing the
markup that tools, calls or results are rendered in."""

import asyncio

import pytest

agents = pytest.importorskip("agents")
from openai import AsyncOpenAI  # noqa: E402

from services import tool_format  # noqa: E402

MARKERS = (tool_format.CALL_OPEN, tool_format.CALL_CLOSE, "<tool_response>", "<tools>", "<|im_")
QUESTIONS = {
    "What is the weather in Paris?": "Paris",
    "Is it warm in Tokyo today?": "Tokyo",
}


@agents.function_tool
def get_weather(city: str) -> str:
    """Returns the current weather in a city."""
    return f"The weather in {city} is sunny, 22 degrees Celsius."


async def run_agent(base_url: str, model: str, question: str) -> agents.RunResult:
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    agent = agents.Agent(
        name="assistant",
        instructions="You are a helpful assistant. Use the tools when they help.",
        model=agents.OpenAIChatCompletionsModel(model=model, openai_client=client),
        tools=[get_weather],
        # The first turn must call the tool; the loop then resets tool_choice to auto, so the
        # second turn answers from the result.
        model_settings=agents.ModelSettings(temperature=0.0, max_tokens=48, tool_choice="required"),
    )
    config = agents.RunConfig(tracing_disabled=True)
    return await agents.Runner.run(agent, question, max_turns=3, run_config=config)


@pytest.mark.parametrize("question", list(QUESTIONS))
def test_agent_answers_from_the_tool_result_without_markup(stack, model, question) -> None:
    result = asyncio.run(run_agent(stack.http_url, model, question))
    outputs = [i for i in result.new_items if isinstance(i, agents.ToolCallOutputItem)]
    assert len(outputs) == 1 and QUESTIONS[question] in outputs[0].output
    final = result.final_output
    assert isinstance(final, str) and final.strip()
    assert not [marker for marker in MARKERS if marker in final], final
