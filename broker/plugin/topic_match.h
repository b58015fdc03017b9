/*
 * The plugin's topic matcher: pure C, no Mosquitto, so it has unit tests of its own
 * (tests/plugin/test_topic_match.c, built and run by tests/test_plugin_matcher.py).
 *
 * Mosquitto's mosquitto_topic_matches_sub() answers "does this filter match this topic";
 * the policy also needs "does this rule cover every topic this subscription filter can
 * name" and a "%t" level that matches only the connection's own thing name.
 */
#ifndef FLEET_TOPIC_MATCH_H
#define FLEET_TOPIC_MATCH_H

#include <stdbool.h>

/*
 * True when every topic that `subject` can name is matched by `pattern`.
 * `subject` is a topic (publish, receive) or, with is_filter, a subscription
 * filter whose own wildcards must be covered. "%t" in a pattern matches only
 * `thing` (never when it is NULL). A wildcard in the first level never matches a
 * topic starting with '$' (MQTT 4.7.2).
 */
bool fleet_covers(const char *pattern, const char *subject, const char *thing, bool is_filter);

#endif
