//! Why a model stopped, in each API's words. OpenAI's `finish_reason` and Anthropic's
//! `stop_reason` do not map one to one: the closest meaning is taken, and what has no
//! counterpart falls back to a normal end.

/// Anthropic `stop_reason` → OpenAI `finish_reason`.
pub fn to_finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and any reason added later.
        _ => "stop",
    }
}

/// OpenAI `finish_reason` → Anthropic `stop_reason`.
pub fn to_stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_maps_back_to_itself_where_both_have_it() {
        for finish in ["stop", "length", "tool_calls", "content_filter"] {
            assert_eq!(to_finish_reason(to_stop_reason(finish)), finish);
        }
        for stop in ["end_turn", "max_tokens", "tool_use", "refusal"] {
            assert_eq!(to_stop_reason(to_finish_reason(stop)), stop);
        }
        assert_eq!(to_finish_reason("stop_sequence"), "stop");
        assert_eq!(to_finish_reason("something_new"), "stop");
    }
}
