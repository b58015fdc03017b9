/*
 * mqtt-fleet enforcement plugin for Mosquitto 2.0 (plugin API v5).
 *
 * Mosquitto alone cannot bind a client id to a certificate, route a reply to
 * one connection, refuse a SUBSCRIBE, or tell a service who sent a request.
 * This plugin does exactly that and nothing more; policy (which identity may
 * touch which topic) is rendered by the Python side into a policy file and
 * state (certificates, things) lives in the registry, read here read-only.
 *
 * Identity: the SHA-256 of the client certificate's DER is its certificate id
 * (as on AWS IoT); the registry says its role (device / claim / service), its
 * status and, for devices, the thing it is attached to. The username of every
 * accepted connection is set to the thing name (devices) or "@claim" /
 * "@service", characters a thing name cannot contain.
 *
 * Requests: a publish on a "forward" topic (the AWS request topics) is never
 * broadcast. It is copied, stamped with the sender's identity as MQTT 5 user
 * properties, to the service's client id only, and the original is sunk.
 * A Last Will bypasses MOSQ_EVT_MESSAGE, so a will on a request topic is not
 * forwarded, carries no stamp, and reaches nobody.
 *
 * Replies: the service publishes with user properties fleet-reply-to (client
 * id) and fleet-connection (the connection serial from the stamp); the plugin
 * delivers the message to that connection only, and only if it is still the
 * same connection that asked.
 *
 * First connect: when a device connects with a certificate registered but not
 * yet seen connected (registry column awaiting_first_connect), the plugin tells
 * the service, stamped with that connection's identity, on
 * EVENT_FIRST_CONNECT_TOPIC; the service then counts it as in use and, for a
 * renewal, retires the certificate it replaces. One message per certificate.
 *
 * Client-id spaces: a device's client id is its thing name; a claim's must start
 * with plugin_opt_claim_prefix (default "claim-", a prefix no thing name may take),
 * so a claim can neither take nor probe a thing's id; ids starting with '@' (no
 * thing name has one) belong to the service identity: its operator tools.
 *
 * Revocation does not rest on one message: once a second (MOSQ_EVT_TICK) the plugin
 * asks the registry which certificates stopped being ACTIVE lately and disconnects
 * whoever still uses one, so a lost kick costs at most a second.
 *
 * Quota: devices and claims may send plugin_opt_request_rate requests a second
 * (token bucket of plugin_opt_request_burst). A request beyond it is not forwarded:
 * it gets a 429 on its rejected topic (AWS's answer to throttled requests), the
 * first request_burst of every 10 s at most, and a connection with more than
 * plugin_opt_flood_disconnect requests over quota within 10 s is disconnected. So one client
 * cannot fill the services' queue and make the broker drop everybody's requests.
 * Requests with QoS 2 (AWS IoT has none; Mosquitto would run a resent one twice)
 * and retained requests (a retained Will would stick where its device cannot
 * clear it) are refused on request topics.
 */
#include <ctype.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/x509.h>
#include <sqlite3.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <mqtt_protocol.h>

#include "topic_match.h"

#define LOG_PREFIX "mqtt-fleet: "
#define PROP_PREFIX "fleet-"
#define SINK_TOPIC "$fleet/void"
#define CONTROL_TOPIC "$CONTROL/fleet/v1"
#define EVENT_FIRST_CONNECT_TOPIC "$fleet/v1/events/first-connect"
#define CERT_ID_LEN 64
#define BUCKETS 16384
#define OPERATOR_ID_PREFIX '@'
#define SWEEP_OVERLAP_S 30.0 /* a write's timestamp precedes its commit */
#define MAX_PENDING_KICKS 256
#define FLOOD_WINDOW_S 10.0

enum role { ROLE_NONE = 0, ROLE_DEVICE = 1, ROLE_CLAIM = 2, ROLE_SERVICE = 4 };
enum access { ACC_PUBLISH = 1, ACC_SUBSCRIBE = 2, ACC_RECEIVE = 4 };

struct rule {
	int roles;
	int access;
	char *filter;
};

struct policy {
	struct rule *rules;
	size_t rule_count;
	char **forward;
	size_t forward_count;
};

/* One live connection per client id, as the broker sees it. */
struct conn {
	char *client_id;
	const struct mosquitto *client;
	unsigned long long serial;
	enum role role;
	char cert_id[CERT_ID_LEN + 1];
	double tokens;          /* request quota left (token bucket) */
	double refilled_at;     /* monotonic seconds */
	unsigned long throttled;  /* requests over quota in the current window */
	double window_at;         /* monotonic seconds the window began */
	struct conn *next;
};

static mosquitto_plugin_id_t *plugin_id;
static char *registry_path;
static char *policy_path;
static char *service_id;
static sqlite3 *registry;
static sqlite3_stmt *stmt_certificate;
static sqlite3_stmt *stmt_thing;
static sqlite3_stmt *stmt_changed;
static struct policy policy;
static char *claim_prefix;
static double request_rate = 100.0;       /* per second; 0: no quota */
static double request_burst = 100.0;
static unsigned long flood_disconnect = 1000;
static double last_sweep_at;              /* wall-clock seconds of the last sweep */
/* Flooders to disconnect, once the 429s already queued for them have gone out. */
#define KICK_DELAY_S 0.5
struct pending_kick {
	char *client_id;
	double due; /* monotonic seconds */
};
static struct pending_kick pending_kicks[MAX_PENDING_KICKS];
static size_t pending_kick_count;
static struct conn *conns[BUCKETS];
static unsigned long long next_serial = 1;

/* ---------------------------------------------------------------- helpers */

static unsigned long hash_str(const char *s)
{
	unsigned long h = 5381;
	while(*s) h = h * 33 + (unsigned char)*s++;
	return h % BUCKETS;
}

static double wall_seconds(void)
{
	struct timeval tv;
	gettimeofday(&tv, NULL);
	return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static double monotonic_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct conn *conn_find(const char *client_id)
{
	struct conn *c;
	for(c = conns[hash_str(client_id)]; c; c = c->next){
		if(!strcmp(c->client_id, client_id)) return c;
	}
	return NULL;
}

static void conn_remove(const char *client_id, const struct mosquitto *client)
{
	struct conn **pp = &conns[hash_str(client_id)];
	while(*pp){
		struct conn *c = *pp;
		if(!strcmp(c->client_id, client_id) && c->client == client){
			*pp = c->next;
			mosquitto_free(c->client_id);
			mosquitto_free(c);
			return;
		}
		pp = &c->next;
	}
}

static bool valid_thing_name(const char *s)
{
	size_t n = 0;
	for(; *s; s++, n++){
		if(!isalnum((unsigned char)*s) && *s != ':' && *s != '_' && *s != '-') return false;
	}
	return n >= 1 && n <= 128;
}

static enum role role_of_username(const char *username)
{
	if(!username) return ROLE_NONE;
	if(!strcmp(username, "@claim")) return ROLE_CLAIM;
	if(!strcmp(username, "@service")) return ROLE_SERVICE;
	if(valid_thing_name(username)) return ROLE_DEVICE;
	return ROLE_NONE;
}

static const char *role_name(enum role r)
{
	switch(r){
		case ROLE_DEVICE: return "device";
		case ROLE_CLAIM: return "claim";
		case ROLE_SERVICE: return "service";
		default: return "none";
	}
}

static bool certificate_id(X509 *cert, char out[CERT_ID_LEN + 1])
{
	unsigned char *der = NULL;
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int md_len = 0;
	int len = i2d_X509(cert, &der);
	if(len <= 0) return false;
	int ok = EVP_Digest(der, (size_t)len, md, &md_len, EVP_sha256(), NULL);
	OPENSSL_free(der);
	if(!ok || md_len != 32) return false;
	for(unsigned int i = 0; i < md_len; i++) sprintf(out + 2 * i, "%02x", md[i]);
	out[CERT_ID_LEN] = '\0';
	return true;
}

/* ------------------------------------------------------------- topic match */

static bool allowed(enum role role, int access, const char *subject, const char *thing)
{
	for(size_t i = 0; i < policy.rule_count; i++){
		const struct rule *r = &policy.rules[i];
		if((r->roles & role) && (r->access & access)
				&& fleet_covers(r->filter, subject, role == ROLE_DEVICE ? thing : NULL,
					access == ACC_SUBSCRIBE)){
			return true;
		}
	}
	return false;
}

/* A plain "does this filter match this topic": Mosquitto's own matcher. */
static bool is_request_topic(const char *topic)
{
	for(size_t i = 0; i < policy.forward_count; i++){
		bool match = false;
		if(mosquitto_topic_matches_sub(policy.forward[i], topic, &match) == MOSQ_ERR_SUCCESS && match){
			return true;
		}
	}
	return false;
}

/* ------------------------------------------------------------------ policy */

static void policy_free(struct policy *p)
{
	for(size_t i = 0; i < p->rule_count; i++) free(p->rules[i].filter);
	for(size_t i = 0; i < p->forward_count; i++) free(p->forward[i]);
	free(p->rules);
	free(p->forward);
	memset(p, 0, sizeof(*p));
}

static int parse_roles(const char *s)
{
	if(!strcmp(s, "device")) return ROLE_DEVICE;
	if(!strcmp(s, "claim")) return ROLE_CLAIM;
	if(!strcmp(s, "service")) return ROLE_SERVICE;
	return 0;
}

static int parse_access(const char *s)
{
	if(!strcmp(s, "publish")) return ACC_PUBLISH;
	if(!strcmp(s, "subscribe")) return ACC_SUBSCRIBE;
	if(!strcmp(s, "receive")) return ACC_RECEIVE;
	return 0;
}

/* Lines: "allow <role> <publish|subscribe|receive> <filter>" or "forward <filter>". */
static int policy_load(const char *path, struct policy *out)
{
	FILE *f = fopen(path, "r");
	char line[1024];
	int lineno = 0;
	struct policy p = {0};
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "cannot read policy file %s", path);
		return MOSQ_ERR_INVAL;
	}
	while(fgets(line, sizeof(line), f)){
		char *save = NULL, *kind, *a, *b, *c;
		lineno++;
		kind = strtok_r(line, " \t\r\n", &save);
		if(!kind || kind[0] == '#') continue;
		a = strtok_r(NULL, " \t\r\n", &save);
		b = strtok_r(NULL, " \t\r\n", &save);
		c = strtok_r(NULL, " \t\r\n", &save);
		if(!strcmp(kind, "forward") && a && !b){
			char **grown = realloc(p.forward, (p.forward_count + 1) * sizeof(char *));
			if(!grown) goto fail;
			p.forward = grown;
			p.forward[p.forward_count++] = strdup(a);
		}else if(!strcmp(kind, "allow") && a && b && c && parse_roles(a) && parse_access(b)){
			struct rule *grown = realloc(p.rules, (p.rule_count + 1) * sizeof(struct rule));
			if(!grown) goto fail;
			p.rules = grown;
			p.rules[p.rule_count].roles = parse_roles(a);
			p.rules[p.rule_count].access = parse_access(b);
			p.rules[p.rule_count].filter = strdup(c);
			p.rule_count++;
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "%s:%d: not a policy line", path, lineno);
			goto fail;
		}
	}
	fclose(f);
	*out = p;
	return MOSQ_ERR_SUCCESS;
fail:
	fclose(f);
	policy_free(&p);
	return MOSQ_ERR_INVAL;
}

/* ---------------------------------------------------------------- registry */

struct cert_record {
	bool found;
	bool active;
	bool awaiting_first_connect;
	enum role role;
	char thing[129];
};

static bool lookup_certificate(const char *cert_id, struct cert_record *rec)
{
	int rc;
	memset(rec, 0, sizeof(*rec));
	sqlite3_reset(stmt_certificate);
	sqlite3_bind_text(stmt_certificate, 1, cert_id, -1, SQLITE_STATIC);
	rc = sqlite3_step(stmt_certificate);
	if(rc == SQLITE_ROW){
		const char *status = (const char *)sqlite3_column_text(stmt_certificate, 0);
		const char *role = (const char *)sqlite3_column_text(stmt_certificate, 1);
		const char *thing = (const char *)sqlite3_column_text(stmt_certificate, 2);
		const char *thing_status = (const char *)sqlite3_column_text(stmt_certificate, 4);
		rec->found = true;
		/* A revoked thing's certificates are refused too, whatever their own status. */
		rec->active = status && !strcmp(status, "ACTIVE")
			&& (!thing_status || !strcmp(thing_status, "ACTIVE"));
		rec->role = role ? (enum role)parse_roles(role) : ROLE_NONE;
		rec->awaiting_first_connect = sqlite3_column_int(stmt_certificate, 3) != 0;
		if(thing && strlen(thing) < sizeof(rec->thing)) strcpy(rec->thing, thing);
	}else if(rc != SQLITE_DONE){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "registry lookup failed: %s", sqlite3_errmsg(registry));
		sqlite3_reset(stmt_certificate);
		return false;
	}
	sqlite3_reset(stmt_certificate);
	return true;
}

/* Returns 1 if a thing of that name exists, 0 if not, -1 on error. */
static int thing_exists(const char *name)
{
	int rc;
	sqlite3_reset(stmt_thing);
	sqlite3_bind_text(stmt_thing, 1, name, -1, SQLITE_STATIC);
	rc = sqlite3_step(stmt_thing);
	sqlite3_reset(stmt_thing);
	if(rc == SQLITE_ROW) return 1;
	if(rc == SQLITE_DONE) return 0;
	return -1;
}

static int registry_open(void)
{
	int rc = sqlite3_open_v2(registry_path, &registry, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
	if(rc != SQLITE_OK){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "cannot open registry %s: %s",
				registry_path, registry ? sqlite3_errmsg(registry) : "out of memory");
		return MOSQ_ERR_INVAL;
	}
	sqlite3_busy_timeout(registry, 2000);
	if(sqlite3_prepare_v2(registry, "SELECT c.status, c.role, c.thing_name, c.awaiting_first_connect, t.status"
				" FROM certificates c LEFT JOIN things t ON t.name = c.thing_name WHERE c.id = ?1",
				-1, &stmt_certificate, NULL) != SQLITE_OK
			|| sqlite3_prepare_v2(registry, "SELECT 1 FROM things WHERE name = ?1",
				-1, &stmt_thing, NULL) != SQLITE_OK
			|| sqlite3_prepare_v2(registry, "SELECT id FROM certificates WHERE updated_at > ?1 AND status IN ('INACTIVE', 'REVOKED')",
				-1, &stmt_changed, NULL) != SQLITE_OK){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "registry %s has no fleet schema: %s",
				registry_path, sqlite3_errmsg(registry));
		return MOSQ_ERR_INVAL;
	}
	return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------ connections */

static void notify_first_connect(const struct conn *c, const char *thing);

static int refuse(const char *client_id, const char *cert_id, const char *why)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "refused client id '%s' (certificate %.12s): %s",
			client_id ? client_id : "", cert_id, why);
	return MOSQ_ERR_AUTH;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *client_id = mosquitto_client_id(ed->client);
	char cert_id[CERT_ID_LEN + 1];
	struct cert_record rec;
	struct conn *existing;
	X509 *cert;
	bool ok;
	(void)event;
	(void)userdata;

	cert = mosquitto_client_certificate(ed->client);
	if(!cert){
		/* On SIGHUP Mosquitto re-authenticates every session, offline ones
		 * included; those have no certificate and refusing them corrupts the
		 * broker. Safe because every listener requires a certificate. */
		return MOSQ_ERR_SUCCESS;
	}
	ok = certificate_id(cert, cert_id);
	X509_free(cert);
	if(!ok || !client_id) return refuse(client_id, "?", "cannot read certificate");
	if(!lookup_certificate(cert_id, &rec)) return refuse(client_id, cert_id, "registry unavailable");
	if(!rec.found) return refuse(client_id, cert_id, "certificate not registered");
	if(!rec.active) return refuse(client_id, cert_id, "certificate not ACTIVE");

	existing = conn_find(client_id);
	if(existing && existing->client == ed->client) existing = NULL; /* re-authentication */

	switch(rec.role){
		case ROLE_DEVICE:
			if(!rec.thing[0] || !valid_thing_name(rec.thing)){
				return refuse(client_id, cert_id, "device certificate not attached to a thing");
			}
			if(strcmp(client_id, rec.thing)){
				return refuse(client_id, cert_id, "client id must be the thing name");
			}
			if((service_id && !strcmp(client_id, service_id)) || (existing && existing->role == ROLE_SERVICE)){
				return refuse(client_id, cert_id, "client id reserved for the fleet services");
			}
			break;
		case ROLE_CLAIM:
			if(service_id && !strcmp(client_id, service_id)){
				return refuse(client_id, cert_id, "client id reserved for the fleet services");
			}
			if(client_id[0] == OPERATOR_ID_PREFIX){
				return refuse(client_id, cert_id, "client id reserved for operator tools");
			}
			if(claim_prefix[0] && strncmp(client_id, claim_prefix, strlen(claim_prefix))){
				/* Decided by the id alone: the answer says nothing about the registry. */
				return refuse(client_id, cert_id, "a claim's client id must start with the claim prefix");
			}
			if(existing) return refuse(client_id, cert_id, "client id in use by another connection");
			switch(thing_exists(client_id)){
				case 1: return refuse(client_id, cert_id, "client id is a registered thing's name");
				case 0: break;
				default: return refuse(client_id, cert_id, "registry unavailable");
			}
			break;
		case ROLE_SERVICE:
			if(existing && existing->role != ROLE_SERVICE){
				return refuse(client_id, cert_id, "client id in use by another identity");
			}
			if(service_id && !strcmp(client_id, service_id)) break; /* reserved for it */
			if(client_id[0] == OPERATOR_ID_PREFIX) break; /* operator tools: no thing has one */
			switch(thing_exists(client_id)){
				case 1: return refuse(client_id, cert_id, "client id is a registered thing's name");
				case 0: break;
				default: return refuse(client_id, cert_id, "registry unavailable");
			}
			break;
		default:
			return refuse(client_id, cert_id, "unknown role");
	}

	if(mosquitto_set_username(ed->client, rec.role == ROLE_DEVICE ? rec.thing
				: rec.role == ROLE_CLAIM ? "@claim" : "@service") != MOSQ_ERR_SUCCESS){
		return MOSQ_ERR_NOMEM;
	}

	existing = conn_find(client_id);
	if(existing && existing->client == ed->client){
		existing->role = rec.role;
		memcpy(existing->cert_id, cert_id, sizeof(cert_id));
		return MOSQ_ERR_SUCCESS;
	}
	if(!existing){
		unsigned long b = hash_str(client_id);
		existing = mosquitto_calloc(1, sizeof(*existing));
		if(!existing) return MOSQ_ERR_NOMEM;
		existing->client_id = mosquitto_strdup(client_id);
		if(!existing->client_id){
			mosquitto_free(existing);
			return MOSQ_ERR_NOMEM;
		}
		existing->next = conns[b];
		conns[b] = existing;
	}
	/* A takeover (the same device reconnecting) gets a new serial, so replies
	 * meant for the old connection are not delivered to the new one. */
	existing->client = ed->client;
	existing->serial = next_serial++;
	existing->role = rec.role;
	existing->tokens = request_burst;
	existing->refilled_at = monotonic_seconds();
	existing->throttled = 0;
	existing->window_at = existing->refilled_at;
	memcpy(existing->cert_id, cert_id, sizeof(cert_id));
	if(rec.role == ROLE_DEVICE && rec.awaiting_first_connect) notify_first_connect(existing, rec.thing);
	return MOSQ_ERR_SUCCESS;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	const char *client_id = mosquitto_client_id(ed->client);
	(void)event;
	(void)userdata;
	if(client_id) conn_remove(client_id, ed->client);
	return MOSQ_ERR_SUCCESS;
}

/* --------------------------------------------------------------------- ACL */

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *username = mosquitto_client_username(ed->client);
	enum role role = role_of_username(username);
	int access;
	(void)event;
	(void)userdata;

	switch(ed->access){
		case MOSQ_ACL_WRITE: access = ACC_PUBLISH; break;
		case MOSQ_ACL_SUBSCRIBE: access = ACC_SUBSCRIBE; break;
		case MOSQ_ACL_READ: access = ACC_RECEIVE; break;
		case MOSQ_ACL_UNSUBSCRIBE: return MOSQ_ERR_SUCCESS;
		default: return MOSQ_ERR_ACL_DENIED;
	}
	if(role == ROLE_NONE) return MOSQ_ERR_ACL_DENIED;
	if(access == ACC_PUBLISH && (ed->qos == 2 || ed->retain) && is_request_topic(ed->topic)){
		/* Wills are checked here too: a retained Will on a request topic never sticks. */
		return MOSQ_ERR_ACL_DENIED;
	}
	if(access == ACC_SUBSCRIBE && !strncmp(ed->topic, "$share/", 7)){
		/* Shared subscriptions: judge the filter after "$share/<group>/". */
		const char *rest = strchr(ed->topic + 7, '/');
		if(!rest) return MOSQ_ERR_ACL_DENIED;
		return allowed(role, access, rest + 1, username) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
	}
	return allowed(role, access, ed->topic, username) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

/* -------------------------------------------------------------- properties */

static bool is_fleet_property(const mosquitto_property *p)
{
	char *name = NULL, *value = NULL;
	bool ours;
	if(mosquitto_property_identifier(p) != MQTT_PROP_USER_PROPERTY) return false;
	if(!mosquitto_property_read_string_pair(p, MQTT_PROP_USER_PROPERTY, &name, &value, false)) return false;
	ours = name && !strncmp(name, PROP_PREFIX, strlen(PROP_PREFIX));
	mosquitto_free(name);
	mosquitto_free(value);
	return ours;
}

/* Copy one property onto *dest. Returns false on allocation failure. */
static bool copy_property(mosquitto_property **dest, const mosquitto_property *p)
{
	int id = mosquitto_property_identifier(p);
	uint8_t b;
	uint16_t i16;
	uint32_t i32;
	char *s1 = NULL, *s2 = NULL;
	void *bin = NULL;
	int rc = MOSQ_ERR_SUCCESS;

	switch(id){
		case MQTT_PROP_PAYLOAD_FORMAT_INDICATOR:
			mosquitto_property_read_byte(p, id, &b, false);
			rc = mosquitto_property_add_byte(dest, id, b);
			break;
		case MQTT_PROP_MESSAGE_EXPIRY_INTERVAL:
			mosquitto_property_read_int32(p, id, &i32, false);
			rc = mosquitto_property_add_int32(dest, id, i32);
			break;
		case MQTT_PROP_CONTENT_TYPE:
		case MQTT_PROP_RESPONSE_TOPIC:
			if(!mosquitto_property_read_string(p, id, &s1, false)) return true;
			rc = mosquitto_property_add_string(dest, id, s1);
			break;
		case MQTT_PROP_CORRELATION_DATA:
			if(!mosquitto_property_read_binary(p, id, &bin, &i16, false)) return true;
			rc = mosquitto_property_add_binary(dest, id, bin, i16);
			break;
		case MQTT_PROP_USER_PROPERTY:
			if(!mosquitto_property_read_string_pair(p, id, &s1, &s2, false)) return true;
			rc = mosquitto_property_add_string_pair(dest, id, s1, s2);
			break;
		default:
			/* Topic alias and subscription identifiers are per-hop; drop. */
			break;
	}
	mosquitto_free(s1);
	mosquitto_free(s2);
	mosquitto_free(bin);
	return rc == MOSQ_ERR_SUCCESS;
}

/* A copy of `props` without any fleet-* user property. */
static bool copy_without_fleet(mosquitto_property **dest, const mosquitto_property *props)
{
	for(const mosquitto_property *p = props; p; p = mosquitto_property_next(p)){
		if(is_fleet_property(p)) continue;
		if(!copy_property(dest, p)) return false;
	}
	return true;
}

static bool has_fleet_property(const mosquitto_property *props)
{
	for(const mosquitto_property *p = props; p; p = mosquitto_property_next(p)){
		if(is_fleet_property(p)) return true;
	}
	return false;
}

/* Value of the user property `name`, newly allocated, or NULL. */
static char *user_property(const mosquitto_property *props, const char *name)
{
	for(const mosquitto_property *p = props; p; p = mosquitto_property_next(p)){
		char *n = NULL, *v = NULL;
		if(mosquitto_property_identifier(p) != MQTT_PROP_USER_PROPERTY) continue;
		if(!mosquitto_property_read_string_pair(p, MQTT_PROP_USER_PROPERTY, &n, &v, false)) continue;
		if(n && !strcmp(n, name)){
			mosquitto_free(n);
			return v;
		}
		mosquitto_free(n);
		mosquitto_free(v);
	}
	return NULL;
}

static int sink(struct mosquitto_evt_message *ed)
{
	char *topic = mosquitto_strdup(SINK_TOPIC);
	if(!topic) return MOSQ_ERR_NOMEM;
	mosquitto_free(ed->topic);
	ed->topic = topic;
	ed->retain = false;
	return MOSQ_ERR_SUCCESS;
}

/* --------------------------------------------------------------- messages */

static int deliver_reply(struct mosquitto_evt_message *ed)
{
	char *target = user_property(ed->properties, PROP_PREFIX "reply-to");
	char *serial = user_property(ed->properties, PROP_PREFIX "connection");
	mosquitto_property *props = NULL;
	struct conn *c;
	int rc = MOSQ_ERR_SUCCESS;

	if(!target) return MOSQ_ERR_SUCCESS; /* an ordinary broadcast */
	c = conn_find(target);
	if(c && serial && strtoull(serial, NULL, 10) == c->serial){
		if(copy_without_fleet(&props, ed->properties)){
			rc = mosquitto_broker_publish_copy(target, ed->topic, (int)ed->payloadlen, ed->payload,
					ed->qos, false, props);
		}else{
			mosquitto_property_free_all(&props);
			rc = MOSQ_ERR_NOMEM;
		}
	}else{
		mosquitto_log_printf(MOSQ_LOG_INFO, LOG_PREFIX "reply to '%s' dropped: that connection is gone", target);
	}
	mosquitto_free(target);
	mosquitto_free(serial);
	if(rc != MOSQ_ERR_SUCCESS) return rc;
	return sink(ed);
}

/* One property, "<connection> <role> <certificate id> <thing or -> <client id>": the client
 * id goes last because it alone may contain spaces. One property instead of five halves
 * the service's MQTT 5 parsing cost per request. */
static int add_sender(mosquitto_property **props, const struct conn *c, const char *username)
{
	size_t sender_len = strlen(c->client_id) + strlen(username ? username : "-") + CERT_ID_LEN + 48;
	char *sender = mosquitto_malloc(sender_len);
	int rc;
	if(!sender) return MOSQ_ERR_NOMEM;
	snprintf(sender, sender_len, "%llu %s %s %s %s", c->serial, role_name(c->role), c->cert_id,
			c->role == ROLE_DEVICE && username ? username : "-", c->client_id);
	rc = mosquitto_property_add_string_pair(props, MQTT_PROP_USER_PROPERTY, PROP_PREFIX "sender", sender);
	mosquitto_free(sender);
	return rc;
}

/* Tell the service that a certificate has connected for the first time (see the header). */
static void notify_first_connect(const struct conn *c, const char *thing)
{
	mosquitto_property *props = NULL;
	if(!service_id) return;
	if(add_sender(&props, c, thing) != MOSQ_ERR_SUCCESS){
		mosquitto_property_free_all(&props);
		return;
	}
	/* Queued for the service's persistent session: delivered even if it is restarting. */
	if(mosquitto_broker_publish(service_id, EVENT_FIRST_CONNECT_TOPIC, 0, NULL, 1, false, props)
			!= MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "cannot tell the service of the first connect of %.12s", c->cert_id);
	}
}

/* Take one request from the connection's quota; false when it has none left. */
static bool take_quota(struct conn *c)
{
	double now, tokens;
	if(request_rate <= 0 || c->role == ROLE_SERVICE) return true;
	now = monotonic_seconds();
	tokens = c->tokens + (now - c->refilled_at) * request_rate;
	c->tokens = tokens > request_burst ? request_burst : tokens;
	c->refilled_at = now;
	if(c->tokens < 1.0) return false;
	c->tokens -= 1.0;
	return true;
}

/* The request's clientToken, if it is a plain JSON string of at most 64 bytes. */
static void client_token_of(const char *payload, size_t len, char out[65])
{
	static const char key[] = "\"clientToken\"";
	const char *end = payload + len, *p;
	out[0] = '\0';
	for(p = payload; p + sizeof(key) - 1 < end; p++){
		if(memcmp(p, key, sizeof(key) - 1)) continue;
		p += sizeof(key) - 1;
		while(p < end && isspace((unsigned char)*p)) p++;
		if(p >= end || *p++ != ':') return;
		while(p < end && isspace((unsigned char)*p)) p++;
		if(p >= end || *p++ != '"') return;
		for(size_t n = 0; p + n < end && n <= 64; n++){
			unsigned char ch = (unsigned char)p[n];
			if(ch == '"'){
				memcpy(out, p, n);
				out[n] = '\0';
				return;
			}
			if(ch == '\\' || ch < 0x20) return;
		}
		return;
	}
}

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);
	return n >= m && !strcmp(s + n - m, suffix);
}

/* AWS's answer to a throttled request, on its rejected topic, to that connection only. */
static void reply_throttled(const struct mosquitto_evt_message *ed, const char *client_id)
{
	char topic[512], token[65], payload[256];
	int n;
	if(ends_with(ed->topic, "/cbor")) return; /* this plugin speaks no CBOR */
	if(snprintf(topic, sizeof(topic), "%s/rejected", ed->topic) >= (int)sizeof(topic)) return;
	if(!strncmp(ed->topic, "$aws/things/", 12)){
		client_token_of(ed->payload, ed->payloadlen, token);
		n = snprintf(payload, sizeof(payload),
				"{\"code\":429,\"message\":\"Too Many Requests\",\"timestamp\":%lld%s%s%s}",
				(long long)time(NULL), token[0] ? ",\"clientToken\":\"" : "", token, token[0] ? "\"" : "");
	}else{
		n = snprintf(payload, sizeof(payload),
				"{\"statusCode\":429,\"errorCode\":\"Throttling\",\"errorMessage\":"
				"\"Too many requests from this connection; slow down.\"}");
	}
	if(n <= 0 || n >= (int)sizeof(payload)) return;
	mosquitto_broker_publish_copy(client_id, topic, n, payload, 0, false, NULL);
}

static void schedule_kick(const char *client_id)
{
	char *id;
	if(pending_kick_count >= MAX_PENDING_KICKS) return;
	for(size_t i = 0; i < pending_kick_count; i++){
		if(!strcmp(pending_kicks[i].client_id, client_id)) return;
	}
	id = mosquitto_strdup(client_id);
	if(!id) return;
	pending_kicks[pending_kick_count].client_id = id;
	pending_kicks[pending_kick_count].due = monotonic_seconds() + KICK_DELAY_S;
	pending_kick_count++;
}

static int throttle(struct mosquitto_evt_message *ed, struct conn *c)
{
	double now = monotonic_seconds();
	if(now - c->window_at >= FLOOD_WINDOW_S){
		c->window_at = now;
		c->throttled = 0;
	}
	c->throttled++;
	if(c->throttled == 1){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "throttling '%s': over %.0f requests/s",
				c->client_id, request_rate);
	}
	/* Answer the first ones of a window: a flood must not become a flood of answers. */
	if(c->throttled <= (unsigned long)request_burst) reply_throttled(ed, c->client_id);
	if(flood_disconnect && c->throttled == flood_disconnect){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "disconnecting '%s': %lu requests over its quota within %.0f s",
				c->client_id, c->throttled, FLOOD_WINDOW_S);
		schedule_kick(c->client_id); /* never from inside its own message */
	}
	return sink(ed);
}

static int forward_request(struct mosquitto_evt_message *ed, const char *client_id, enum role role,
		const char *username)
{
	struct conn *c = conn_find(client_id);
	mosquitto_property *props = NULL;
	int rc;

	if(!c || c->client != ed->client || c->role != role){
		/* Cannot tell who this is: never forward an unattributed request. */
		return sink(ed);
	}
	if(!take_quota(c)) return throttle(ed, c);
	if(!copy_without_fleet(&props, ed->properties) || add_sender(&props, c, username) != MOSQ_ERR_SUCCESS){
		mosquitto_property_free_all(&props);
		return MOSQ_ERR_NOMEM;
	}
	/* QoS 1 at least: the service's persistent session queues requests while it restarts. */
	rc = mosquitto_broker_publish_copy(service_id, ed->topic, (int)ed->payloadlen, ed->payload,
			ed->qos ? ed->qos : 1, false, props);
	if(rc != MOSQ_ERR_SUCCESS) return rc;
	return sink(ed);
}

static int on_message(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_message *ed = event_data;
	const char *client_id = mosquitto_client_id(ed->client);
	const char *username = mosquitto_client_username(ed->client);
	enum role role = role_of_username(username);
	(void)event;
	(void)userdata;

	if(!client_id) return MOSQ_ERR_ACL_DENIED;
	if(role == ROLE_SERVICE && service_id && !strcmp(client_id, service_id)){
		return deliver_reply(ed);
	}
	if(has_fleet_property(ed->properties)){
		/* Never pass on identity properties a client wrote itself. */
		mosquitto_property *clean = NULL;
		if(!copy_without_fleet(&clean, ed->properties)){
			mosquitto_property_free_all(&clean);
			return MOSQ_ERR_NOMEM;
		}
		mosquitto_property_free_all(&ed->properties);
		ed->properties = clean;
	}
	if(service_id && is_request_topic(ed->topic)){
		return forward_request(ed, client_id, role, username);
	}
	return MOSQ_ERR_SUCCESS;
}

/* ---------------------------------------------------------------- control */

/* Disconnect every connection whose certificate id is in ids. */
static void kick_certificates(char **ids, size_t count, const struct mosquitto *spare)
{
	for(size_t b = 0; b < BUCKETS && count; b++){
		struct conn *c = conns[b];
		while(c){
			struct conn *next = c->next;
			for(size_t i = 0; i < count; i++){
				if(c->client == spare || strcmp(c->cert_id, ids[i])) continue;
				char *id = mosquitto_strdup(c->client_id); /* the kick frees c */
				if(id){
					mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "disconnecting '%s': certificate %.12s revoked or no longer ACTIVE", id, ids[i]);
					mosquitto_kick_client_by_clientid(id, false);
					mosquitto_free(id);
				}
				break;
			}
			c = next;
		}
	}
}

/* Payload: lines "kick-certificate <id>". Only the service identity may send. */
static int on_control(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_control *ed = event_data;
	char *text, *save = NULL, *line;
	(void)event;
	(void)userdata;

	if(role_of_username(mosquitto_client_username(ed->client)) != ROLE_SERVICE){
		return MOSQ_ERR_ACL_DENIED;
	}
	text = mosquitto_calloc(1, ed->payloadlen + 1);
	if(!text) return MOSQ_ERR_NOMEM;
	memcpy(text, ed->payload, ed->payloadlen);
	for(line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)){
		char cert_id[CERT_ID_LEN + 1];
		char *ids[1] = {cert_id};
		if(sscanf(line, "kick-certificate %64s", cert_id) != 1) continue;
		kick_certificates(ids, 1, ed->client); /* never the publisher, inside its own message */
	}
	mosquitto_free(text);
	return MOSQ_ERR_SUCCESS;
}

/* Certificates made INACTIVE or REVOKED since the last sweep (with an overlap). Not
 * PENDING_ACTIVATION: those never connected, and onboarding makes them by the hundred a
 * second, each of which the sweep would otherwise compare with every connection. */
static void sweep_revoked(double now)
{
	char *ids[256];
	size_t count = 0;
	int rc;
	sqlite3_reset(stmt_changed);
	sqlite3_bind_double(stmt_changed, 1, (last_sweep_at ? last_sweep_at : now) - SWEEP_OVERLAP_S);
	while((rc = sqlite3_step(stmt_changed)) == SQLITE_ROW){
		const char *id = (const char *)sqlite3_column_text(stmt_changed, 0);
		if(id && count < sizeof(ids) / sizeof(ids[0])){
			ids[count] = mosquitto_strdup(id);
			if(ids[count]) count++;
		}
		if(count == sizeof(ids) / sizeof(ids[0])){
			kick_certificates(ids, count, NULL);
			for(size_t i = 0; i < count; i++) mosquitto_free(ids[i]);
			count = 0;
		}
	}
	sqlite3_reset(stmt_changed);
	if(rc != SQLITE_DONE){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "revocation sweep failed: %s", sqlite3_errmsg(registry));
	}else{
		last_sweep_at = now;
	}
	kick_certificates(ids, count, NULL);
	for(size_t i = 0; i < count; i++) mosquitto_free(ids[i]);
}

static int on_tick(int event, void *event_data, void *userdata)
{
	double now = wall_seconds(), monotonic = monotonic_seconds();
	size_t kept = 0;
	(void)event;
	(void)event_data;
	(void)userdata;
	for(size_t i = 0; i < pending_kick_count; i++){
		if(pending_kicks[i].due > monotonic){
			pending_kicks[kept++] = pending_kicks[i];
			continue;
		}
		mosquitto_kick_client_by_clientid(pending_kicks[i].client_id, false);
		mosquitto_free(pending_kicks[i].client_id);
	}
	pending_kick_count = kept;
	if(now - last_sweep_at >= 1.0) sweep_revoked(now);
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	struct policy fresh;
	(void)event;
	(void)event_data;
	(void)userdata;
	if(policy_load(policy_path, &fresh) == MOSQ_ERR_SUCCESS){
		policy_free(&policy);
		policy = fresh;
	}else{
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "keeping the previous policy");
	}
	return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------- lifecycle */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data;
	plugin_id = identifier;
	for(int i = 0; i < opt_count; i++){
		if(!strcmp(opts[i].key, "registry")) registry_path = mosquitto_strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "policy")) policy_path = mosquitto_strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "service_id")) service_id = mosquitto_strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "claim_prefix")) claim_prefix = mosquitto_strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "request_rate")) request_rate = strtod(opts[i].value, NULL);
		else if(!strcmp(opts[i].key, "request_burst")) request_burst = strtod(opts[i].value, NULL);
		else if(!strcmp(opts[i].key, "flood_disconnect")) flood_disconnect = strtoul(opts[i].value, NULL, 10);
	}
	if(!claim_prefix) claim_prefix = mosquitto_strdup("claim-");
	if(!claim_prefix) return MOSQ_ERR_NOMEM;
	if(request_rate < 0 || request_burst < 1){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "plugin_opt_request_rate must be >= 0 and plugin_opt_request_burst >= 1");
		return MOSQ_ERR_INVAL;
	}
	if(!registry_path || !policy_path || !service_id){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "plugin_opt_registry, plugin_opt_policy and plugin_opt_service_id are required");
		return MOSQ_ERR_INVAL;
	}
	if(registry_open() != MOSQ_ERR_SUCCESS) return MOSQ_ERR_INVAL;
	if(policy_load(policy_path, &policy) != MOSQ_ERR_SUCCESS) return MOSQ_ERR_INVAL;

	if(mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_MESSAGE, on_message, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC, NULL)){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "cannot register callbacks");
		return MOSQ_ERR_INVAL;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "enforcing %zu policy rules, %zu request topics; registry %s;"
			" quota %.0f requests/s (burst %.0f); claim client ids '%s...'",
			policy.rule_count, policy.forward_count, registry_path, request_rate, request_burst, claim_prefix);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data;
	(void)opts;
	(void)opt_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_MESSAGE, on_message, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC);
	for(size_t i = 0; i < pending_kick_count; i++) mosquitto_free(pending_kicks[i].client_id);
	pending_kick_count = 0;
	for(size_t b = 0; b < BUCKETS; b++){
		while(conns[b]){
			struct conn *c = conns[b];
			conns[b] = c->next;
			mosquitto_free(c->client_id);
			mosquitto_free(c);
		}
	}
	policy_free(&policy);
	sqlite3_finalize(stmt_certificate);
	sqlite3_finalize(stmt_thing);
	sqlite3_finalize(stmt_changed);
	sqlite3_close(registry);
	mosquitto_free(registry_path);
	mosquitto_free(policy_path);
	mosquitto_free(service_id);
	mosquitto_free(claim_prefix);
	return MOSQ_ERR_SUCCESS;
}
