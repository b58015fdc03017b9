/* See topic_match.h. */
#include "topic_match.h"

#include <stddef.h>
#include <string.h>

/* Next level of a topic or filter: sets *len, returns pointer past it or NULL at the end. */
static const char *level(const char *s, size_t *len)
{
	const char *slash = strchr(s, '/');
	*len = slash ? (size_t)(slash - s) : strlen(s);
	return slash ? slash + 1 : NULL;
}

static bool level_is(const char *s, size_t len, const char *lit)
{
	return strlen(lit) == len && !strncmp(s, lit, len);
}

bool fleet_covers(const char *pattern, const char *subject, const char *thing, bool is_filter)
{
	const char *p = pattern, *s = subject;
	bool first = true;
	for(;;){
		size_t pl, sl;
		const char *pnext = level(p, &pl);
		if(level_is(p, pl, "#")) return !(first && s[0] == '$');
		const char *snext = level(s, &sl);
		bool s_wild = is_filter && (level_is(s, sl, "+") || level_is(s, sl, "#"));
		if(level_is(p, pl, "+")){
			if(first && sl > 0 && s[0] == '$') return false;
			if(is_filter && level_is(s, sl, "#")) return false;
		}else if(level_is(p, pl, "%t")){
			if(!thing || s_wild || !level_is(s, sl, thing)) return false;
		}else if(s_wild || pl != sl || strncmp(p, s, pl)){
			return false;
		}
		first = false;
		if(!pnext) return !snext;
		if(!snext) return !strcmp(pnext, "#"); /* "a/#" also matches "a" */
		p = pnext;
		s = snext;
	}
}
