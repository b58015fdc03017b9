/*
 * C unit tests of the plugin's topic matcher (broker/plugin/topic_match.c), built and run by
 * tests/test_plugin_matcher.py. Each case: pattern, subject, thing (or NULL), is_filter,
 * expected. Prints every failure and exits 1 if there is one.
 */
#include <stdbool.h>
#include <stdio.h>

#include "topic_match.h"

struct example {
	const char *pattern, *subject, *thing;
	bool is_filter, expected;
};

static const struct example EXAMPLES[] = {
	/* exact topics */
	{"a/b", "a/b", NULL, false, true},
	{"a/b", "a/c", NULL, false, false},
	{"a/b", "a/b/c", NULL, false, false},
	{"a/b/c", "a/b", NULL, false, false},
	{"a/b", "a/bb", NULL, false, false},
	{"", "", NULL, false, true},
	{"a//b", "a//b", NULL, false, true},
	{"a//b", "a/x/b", NULL, false, false},
	/* + matches one level, empty included */
	{"a/+/c", "a/b/c", NULL, false, true},
	{"a/+/c", "a//c", NULL, false, true},
	{"a/+/c", "a/b/d/c", NULL, false, false},
	{"+", "a", NULL, false, true},
	{"+/+", "a/b", NULL, false, true},
	{"+", "a/b", NULL, false, false},
	/* # matches the rest, and the parent level */
	{"a/#", "a/b/c", NULL, false, true},
	{"a/#", "a", NULL, false, true},
	{"a/#", "ab", NULL, false, false},
	{"#", "a/b", NULL, false, true},
	/* a first-level wildcard never matches $ topics (MQTT 4.7.2) */
	{"#", "$SYS/x", NULL, false, false},
	{"+/x", "$SYS/x", NULL, false, false},
	{"$aws/#", "$aws/things/t/shadow/get", NULL, false, true},
	{"$aws/things/+/shadow/get", "$aws/things/t/shadow/get", NULL, false, true},
	{"a/+", "a/$x", NULL, false, true},
	/* %t is the connection's own thing, and only that */
	{"$aws/things/%t/shadow/update", "$aws/things/dev-1/shadow/update", "dev-1", false, true},
	{"$aws/things/%t/shadow/update", "$aws/things/dev-2/shadow/update", "dev-1", false, false},
	{"$aws/things/%t/shadow/update", "$aws/things/dev-1/shadow/update", NULL, false, false},
	{"$aws/things/%t/#", "$aws/things/dev-1x/shadow", "dev-1", false, false},
	{"$aws/things/%t/#", "$aws/things/dev/shadow", "dev-1", false, false},
	{"a/%t", "a/%t", NULL, false, false},
	/* a subscription filter must be covered whole: its wildcards too */
	{"a/#", "a/+/c", NULL, true, true},
	{"a/#", "a/#", NULL, true, true},
	{"a/+", "a/+", NULL, true, true},
	{"a/+", "a/#", NULL, true, false},
	{"a/b", "a/+", NULL, true, false},
	{"a/b/c", "a/#", NULL, true, false},
	{"$aws/things/%t/#", "$aws/things/+/shadow/get", "dev-1", true, false},
	{"$aws/things/%t/#", "$aws/things/#", "dev-1", true, false},
	{"$aws/things/%t/#", "$aws/things/dev-1/#", "dev-1", true, true},
	{"#", "#", NULL, true, true},
	{"#", "$SYS/#", NULL, true, false},
};

int main(void)
{
	int failures = 0;
	size_t count = sizeof(EXAMPLES) / sizeof(EXAMPLES[0]);
	for(size_t i = 0; i < count; i++){
		const struct example *e = &EXAMPLES[i];
		bool got = fleet_covers(e->pattern, e->subject, e->thing, e->is_filter);
		if(got != e->expected){
			printf("FAIL covers(\"%s\", \"%s\", %s%s%s, %s) = %s, want %s\n", e->pattern, e->subject,
					e->thing ? "\"" : "", e->thing ? e->thing : "NULL", e->thing ? "\"" : "",
					e->is_filter ? "filter" : "topic", got ? "true" : "false",
					e->expected ? "true" : "false");
			failures++;
		}
	}
	printf("%zu cases, %d failed\n", count, failures);
	return failures ? 1 : 0;
}
