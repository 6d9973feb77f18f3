"""The synthetic catalog's tables: value pools, the shared parameters, verbs, qualifiers, domain objects and phrasings.

Data only; `synthetic_xlam.py` composes tools and rows from it. A parameter names where its values come from (a
pool, a number range, or one of the generator's value makers by name) and the clauses that state a value in a query.
Editing a table changes the generated corpus: the tool catalog, its query templates and the rows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Sequence

# ---------------------------------------------------------------------------------------------------------------
# Value pools
# ---------------------------------------------------------------------------------------------------------------

CITIES = (
    "Paris", "Berlin", "Tokyo", "New York", "London", "Madrid", "Rome", "Toronto", "Sydney", "Chicago", "Mumbai",
    "Seoul", "Lisbon", "Vienna", "Prague", "Dublin", "Amsterdam", "Barcelona", "Boston", "Seattle", "Austin",
    "Denver", "Miami", "San Francisco", "Los Angeles", "Vancouver", "Montreal", "Mexico City", "Buenos Aires",
    "Sao Paulo", "Lima", "Bogota", "Santiago", "Cairo", "Nairobi", "Lagos", "Cape Town", "Casablanca", "Istanbul",
    "Athens", "Warsaw", "Budapest", "Stockholm", "Oslo", "Copenhagen", "Helsinki", "Zurich", "Geneva", "Munich",
    "Hamburg", "Milan", "Naples", "Lyon", "Marseille", "Brussels", "Edinburgh", "Manchester", "Osaka", "Kyoto",
    "Beijing", "Shanghai", "Hong Kong", "Singapore", "Bangkok", "Hanoi", "Jakarta", "Manila", "Kuala Lumpur",
    "Delhi", "Bangalore", "Dubai", "Doha", "Tel Aviv", "Auckland", "Melbourne", "Perth", "Honolulu", "Reykjavik",
    "Krakow", "Porto",
)
COUNTRIES = (
    "France", "Germany", "Japan", "United States", "United Kingdom", "Spain", "Italy", "Canada", "Australia",
    "India", "South Korea", "Portugal", "Austria", "Czech Republic", "Ireland", "Netherlands", "Brazil", "Mexico",
    "Argentina", "Peru", "Colombia", "Chile", "Egypt", "Kenya", "Nigeria", "South Africa", "Morocco", "Turkey",
    "Greece", "Poland", "Hungary", "Sweden", "Norway", "Denmark", "Finland", "Switzerland", "Belgium", "China",
    "Singapore", "Thailand", "Vietnam", "Indonesia", "Philippines", "Malaysia", "New Zealand",
)
COUNTRY_CODES = (
    "US", "GB", "FR", "DE", "JP", "ES", "IT", "CA", "AU", "IN", "KR", "PT", "AT", "CZ", "IE", "NL", "BR", "MX", "AR",
    "PE", "CO", "CL", "EG", "KE", "NG", "ZA", "MA", "TR", "GR", "PL", "SE", "NO", "DK", "FI", "CH", "BE", "CN", "SG",
    "TH", "VN",
)
NATIONALITIES = (
    "American", "British", "French", "German", "Japanese", "Spanish", "Italian", "Canadian", "Australian", "Indian",
    "Korean", "Brazilian", "Mexican", "Argentinian", "Egyptian", "Kenyan", "Nigerian", "Turkish", "Greek", "Polish",
    "Swedish", "Norwegian", "Dutch", "Irish", "Chinese", "Thai", "Vietnamese", "Filipino", "Chilean", "Peruvian",
)
LANGUAGE_CODES = (
    "en", "fr", "de", "es", "it", "pt", "nl", "sv", "no", "da", "fi", "pl", "cs", "hu", "tr", "el", "ja", "ko", "zh",
    "ar", "hi", "ru",
)
CURRENCIES = (
    "USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "NZD", "SEK", "NOK", "DKK", "PLN", "CZK", "HUF", "TRY", "INR",
    "CNY", "KRW", "SGD", "HKD", "BRL", "MXN", "ZAR", "AED", "THB",
)
STOCK_SYMBOLS = (
    "AAPL", "MSFT", "GOOGL", "AMZN", "NVDA", "META", "TSLA", "NFLX", "AMD", "INTC", "ORCL", "IBM", "CSCO", "ADBE",
    "CRM", "PYPL", "SHOP", "UBER", "ABNB", "SPOT", "KO", "PEP", "MCD", "NKE", "DIS", "V", "MA", "JPM", "GS", "BAC",
)
CRYPTO_SYMBOLS = ("BTC", "ETH", "SOL", "ADA", "XRP", "DOT", "DOGE", "AVAX", "LINK", "LTC", "ATOM", "XLM")
AIRPORTS = (
    "JFK", "LAX", "SFO", "ORD", "ATL", "SEA", "BOS", "MIA", "DFW", "DEN", "LHR", "CDG", "FRA", "AMS", "MAD", "FCO",
    "MUC", "ZRH", "DXB", "SIN", "HND", "NRT", "ICN", "SYD", "YYZ", "YVR", "MEX", "GRU", "DOH", "IST",
)
AIRLINE_CODES = ("LH", "BA", "AF", "UA", "DL", "AA", "KL", "IB", "EK", "SQ", "QF", "AC", "TK", "LX", "OS")
KEYWORDS = (
    "solar panels", "remote work", "electric cars", "machine learning", "climate change", "vegan recipes",
    "home office setup", "mechanical keyboards", "noise cancelling headphones", "trail running shoes",
    "coffee grinder", "standing desk", "budget travel", "indoor plants", "smart watches", "wireless earbuds",
    "camping tents", "yoga mats", "air fryer", "gaming laptops", "renewable energy", "interest rates",
    "space exploration", "cybersecurity", "startup funding", "urban gardening", "electric bikes", "3D printing",
    "quantum computing", "minimalist design", "sourdough bread", "marathon training", "language learning",
    "photography tips", "board games", "vintage watches", "hiking boots", "robot vacuum", "water filters",
    "heat pumps",
)
FIRST_NAMES = (
    "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Maya",
    "Nora", "Omar", "Paula", "Quentin", "Rosa", "Samir", "Tara", "Ugo", "Vera", "Wes", "Ximena", "Yusuf", "Zoe",
    "Lena", "Marco", "Priya", "Tomas",
)
LAST_NAMES = (
    "Smith", "Garcia", "Muller", "Rossi", "Tanaka", "Kim", "Silva", "Novak", "Dubois", "Jensen", "Kowalski",
    "Okafor", "Haddad", "Nguyen", "Patel", "Larsen", "Costa", "Weber", "Moreau", "Ivanova", "Santos", "Brown",
    "Fischer", "Romero", "Sato", "Lopez", "Berg", "Ahmed", "Walsh", "Meyer",
)
TITLE_ADJECTIVES = (
    "Silent", "Golden", "Hidden", "Broken", "Midnight", "Crimson", "Endless", "Forgotten", "Electric", "Wild",
    "Last", "Frozen", "Secret", "Burning", "Quiet", "Distant", "Lucky", "Northern", "Velvet", "Iron", "Paper",
    "Hollow", "Bright", "Lost", "Savage", "Gentle", "Restless", "Scarlet", "Winter", "Summer",
)
TITLE_NOUNS = (
    "River", "Garden", "Empire", "Signal", "Harbor", "Mirror", "Kingdom", "Orchard", "Voyage", "Lantern", "Horizon",
    "Machine", "Island", "Forest", "Letter", "Promise", "Shadow", "Compass", "Station", "Theory", "Circus", "Bridge",
    "Storm", "Archive", "Canyon", "Engine", "Festival", "Frontier", "Library", "Melody",
)
COMPANY_PREFIXES = (
    "Northwind", "Bluepeak", "Silverline", "Redwood", "Brightpath", "Ironclad", "Greenfield", "Suncrest",
    "Clearwater", "Highland", "Stonebridge", "Lumen", "Copperleaf", "Nimbus", "Vertex", "Oakridge", "Seabreeze",
    "Pinecone", "Quantix", "Aurora",
)
COMPANY_SUFFIXES = (
    "Labs", "Systems", "Group", "Analytics", "Foods", "Energy", "Logistics", "Media", "Health", "Motors",
)
TEAM_MASCOTS = (
    "Falcons", "Tigers", "Wolves", "Sharks", "Comets", "Rangers", "Titans", "Hawks", "Bears", "Dragons", "Pirates",
    "Lions", "Storm", "Knights", "Raptors", "Giants", "Rockets", "Eagles", "Vikings", "Panthers",
)
LEAGUES = (
    "Premier League", "La Liga", "Serie A", "Bundesliga", "Ligue 1", "MLS", "Eredivisie", "NBA", "WNBA", "NFL",
    "MLB", "NHL", "EuroLeague", "IPL", "Super Rugby",
)
SPORTS = ("football", "basketball", "tennis", "baseball", "hockey", "cricket", "rugby", "golf")
GENRES = (
    "comedy", "drama", "thriller", "horror", "science fiction", "fantasy", "romance", "documentary", "animation",
    "mystery", "western", "crime", "adventure", "biography", "historical fiction", "jazz", "hip hop", "classical",
    "indie rock", "electronic",
)
CUISINES = (
    "Italian", "Mexican", "Japanese", "Thai", "Indian", "French", "Greek", "Korean", "Vietnamese", "Spanish",
    "Lebanese", "Ethiopian", "Turkish", "Chinese", "Peruvian", "Moroccan", "Brazilian", "Georgian",
)
INGREDIENTS = (
    "chicken", "tofu", "salmon", "chickpeas", "spinach", "mushrooms", "lentils", "eggplant", "shrimp", "quinoa",
    "sweet potato", "zucchini", "beef", "feta", "avocado", "coconut milk", "black beans", "broccoli", "pork",
    "cauliflower", "tempeh", "cod", "kale", "rice noodles", "halloumi", "pumpkin", "lamb", "asparagus", "tuna",
    "bell peppers",
)
FOODS = (
    "banana", "brown rice", "greek yogurt", "almonds", "oatmeal", "apple", "cheddar cheese", "whole wheat bread",
    "boiled egg", "peanut butter", "orange juice", "white rice", "chicken breast", "salmon fillet", "avocado",
    "dark chocolate", "hummus", "blueberries", "sweet potato", "cottage cheese", "walnuts", "lentil soup", "tofu",
    "pasta", "milk", "granola", "mango", "carrots", "spinach", "popcorn",
)
MEDICATIONS = (
    "ibuprofen", "paracetamol", "amoxicillin", "cetirizine", "loratadine", "omeprazole", "metformin", "atorvastatin",
    "lisinopril", "amlodipine", "sertraline", "levothyroxine", "aspirin", "naproxen", "prednisone",
)
JOB_TITLES = (
    "data scientist", "software engineer", "product manager", "nurse", "accountant", "graphic designer",
    "mechanical engineer", "teacher", "pharmacist", "marketing manager", "sales representative", "electrician",
    "UX researcher", "financial analyst", "civil engineer", "chef", "physiotherapist", "lawyer", "architect",
    "devops engineer", "project manager", "copywriter", "HR specialist", "dentist", "pilot",
)
PROGRAMMING_LANGUAGES = ("python", "javascript", "rust", "go", "java", "typescript", "kotlin", "swift", "ruby", "c++")
WORDS = (
    "serendipity", "ephemeral", "resilient", "ubiquitous", "meticulous", "candid", "eloquent", "pragmatic",
    "benevolent", "tenacious", "ambiguous", "nostalgia", "whimsical", "diligent", "gregarious", "lucid", "frugal",
    "vivid", "intrepid", "sublime", "mundane", "quaint", "robust", "obscure", "feasible", "inevitable", "coherent",
    "arbitrary", "tangible", "versatile", "novel", "prudent", "serene", "volatile", "zealous", "astute", "brisk",
    "cordial", "dubious", "earnest", "fervent", "genuine", "humble", "immense", "jovial", "keen", "lavish",
    "modest", "nimble", "opaque", "placid", "rigorous", "sparse", "trivial", "uncanny", "vague", "wary", "candor",
    "paradigm", "catalyst",
)
TEXTS = (
    "The meeting has been moved to Thursday afternoon.",
    "Our new store opens next week with special discounts.",
    "Please remember to bring your passport to the airport.",
    "The weather was perfect for a long walk by the lake.",
    "I really enjoyed the concert last night.",
    "The package arrived damaged and I would like a refund.",
    "Thank you for your quick and friendly support.",
    "The train was delayed by almost two hours.",
    "This recipe takes about forty minutes to prepare.",
    "We are looking for volunteers for the weekend event.",
    "The battery life of this phone is disappointing.",
    "Our team finished the project ahead of schedule.",
    "Traffic in the city center is heavy this morning.",
    "The museum is closed on Mondays and public holidays.",
    "Could you send me the report before Friday?",
    "The hotel room was clean but the breakfast was cold.",
    "Learning a new language takes patience and practice.",
    "The library extended its opening hours for exams.",
    "Heavy rain is expected across the region tonight.",
    "The software update fixed most of the reported bugs.",
    "Customers love the new flavor of our ice cream.",
    "Parking near the stadium is limited on game days.",
    "The conference will be streamed online for free.",
    "My flight was cancelled without any explanation.",
    "The garden looks beautiful after the spring rain.",
    "Please confirm your attendance by replying to this message.",
    "The price of coffee beans has risen sharply this year.",
    "Our support line is available around the clock.",
    "The kids had a great time at the science museum.",
    "The delivery driver left the parcel with a neighbor.",
)
MESSAGES = (
    "Running ten minutes late", "Dinner is at 7", "Call me when you land", "Don't forget the groceries",
    "Meeting moved to room 4", "Happy birthday", "The invoice is attached", "Pick up the dry cleaning",
    "Water the plants", "Team standup starts soon", "Bring the charger", "Book the dentist appointment",
    "Pay the electricity bill", "Renew the car insurance", "Submit the timesheet", "Take the medicine",
    "Buy concert tickets", "Check the oven", "Walk the dog", "Backup the laptop",
)
EMAIL_DOMAINS = ("example.com", "mail.example.org", "inbox.example.net", "company.example", "corp.example.com")
DOMAIN_WORDS = (
    "blue", "peak", "cafe", "garden", "pixel", "river", "stone", "cloud", "maple", "rocket", "harbor", "lemon",
    "north", "spark", "forest", "atlas", "ember", "orbit", "tiger", "quill",
)
TLDS = ("com", "net", "org", "io", "dev", "co", "app", "shop")
STREETS = (
    "Maple", "Oak", "Pine", "Cedar", "Elm", "Birch", "Willow", "Lake", "Hill", "River", "Park", "Church", "Mill",
    "Station", "Harbor", "Sunset", "Meadow", "Forest", "Spring", "Garden",
)
STREET_SUFFIXES = ("Street", "Avenue", "Road", "Lane", "Boulevard", "Drive")
PLAYLIST_MOODS = (
    "Chill", "Workout", "Focus", "Road Trip", "Rainy Day", "Party", "Morning", "Late Night", "Study", "Summer",
)
PLACE_WORDS = ("Kitchen", "Bistro", "Grill", "Trattoria", "Diner", "Table", "Brasserie", "Cantina", "Tavern", "Eatery")
TIMEZONES = (
    "America/New_York", "America/Chicago", "America/Denver", "America/Los_Angeles", "America/Toronto",
    "America/Sao_Paulo", "Europe/London", "Europe/Paris", "Europe/Berlin", "Europe/Madrid", "Europe/Istanbul",
    "Africa/Cairo", "Africa/Nairobi", "Asia/Dubai", "Asia/Kolkata", "Asia/Bangkok", "Asia/Singapore",
    "Asia/Shanghai", "Asia/Tokyo", "Australia/Sydney", "Pacific/Auckland",
)
LENGTH_UNITS = ("meters", "kilometers", "miles", "feet", "inches", "yards", "centimeters", "millimeters")
QUIZ_SUBJECTS = (
    "math", "history", "geography", "biology", "chemistry", "physics", "literature", "music", "art",
    "computer science", "astronomy", "economics",
)
OCCASIONS = ("birthday", "anniversary", "graduation", "wedding", "housewarming", "retirement", "baby shower", "holiday")
DISHES = (
    "grilled salmon", "beef stew", "mushroom risotto", "roast chicken", "spicy curry", "lamb chops", "seafood paella",
    "margherita pizza", "duck confit", "pork ribs", "lobster bisque", "vegetable lasagna", "steak frites",
    "sushi platter", "goat cheese salad", "chocolate cake", "apple pie", "fish tacos", "pad thai", "beef burger",
)
LOTTERIES = (
    "Powerball", "Mega Millions", "EuroMillions", "UK Lotto", "Lotto 6/49", "SuperEnalotto", "El Gordo", "Oz Lotto",
)
VIN_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
UPPER = "ABCDEFGHJKLMNPQRSTUVWXYZ"
FIRST_DAY = dt.date(2023, 1, 1).toordinal()
NUM_DAYS = 4 * 365 + 1
QUARTER_HOURS = (0, 15, 30, 45)
# Arithmetic expressions, filled with two operands in [2, 100) and a third in [2, 20).
EXPRESSION_FORMS = ("({a} + {b}) * {c}", "{a} * {b} - {c}", "{a} / {c} + {b}", "{a} ^ 2 - {b}")

# ---------------------------------------------------------------------------------------------------------------
# Shared parameter vocabulary
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the shared vocabulary: its xLAM type, where its values come from, how a query states one.

    Values come from `maker` (a value maker of the generator, by name) when it is set, else from the number range
    `low`..`high` of an int or float, else from the pool `values`. `space` is about how many distinct values there are.
    """

    name: str
    kind: str
    description: str
    space: int
    clauses: tuple[str, ...]
    false_clauses: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    low: float = 0
    high: float = 0
    step: int = 1
    decimals: int = 0
    maker: str = ""
    prefix: str = ""

    def clause(self, value: Any, index: int) -> str:
        """State `value` in a query with the `index`-th phrasing (booleans state true and false differently)."""
        if self.kind == "bool":
            options = self.clauses if value else self.false_clauses
            return options[index % len(options)]
        return self.clauses[index % len(self.clauses)].format(v=value)


def _vocab(name: str, description: str, values: Sequence[str], *clauses: str) -> ParamSpec:
    """A string parameter drawn from a fixed pool."""
    return ParamSpec(name, "str", description, len(values), clauses, values=tuple(values))


def _enum(name: str, description: str, choices: Sequence[str], *clauses: str) -> ParamSpec:
    """A string parameter with a few allowed values, stated in its description."""
    options = ", ".join(f"'{choice}'" for choice in choices)
    return ParamSpec(name, "str", f"{description} One of {options}.", len(choices), clauses, values=tuple(choices))


def _int(name: str, description: str, low: int, high: int, *clauses: str, step: int = 1) -> ParamSpec:
    """An integer parameter in [low, high] on a grid of `step`."""
    return ParamSpec(name, "int", description, (high - low) // step + 1, clauses, low=low, high=high, step=step)


def _float(name: str, description: str, low: float, high: float, decimals: int, *clauses: str) -> ParamSpec:
    """A float parameter in [low, high] rounded to `decimals` (so the query states it exactly as JSON does)."""
    return ParamSpec(name, "float", description, int((high - low) * 10**decimals), clauses, low=low, high=high,
                     decimals=decimals)


def _made(name: str, description: str, maker: str, space: int, *clauses: str) -> ParamSpec:
    """A string parameter built by the generator's value maker `maker`, with about `space` distinct values."""
    return ParamSpec(name, "str", description, space, clauses, maker=maker)


def _code(name: str, description: str, prefix: str, digits: int, *clauses: str) -> ParamSpec:
    """An identifier: `prefix` followed by a number of exactly `digits` digits."""
    low, high = 10 ** (digits - 1), 10**digits
    return ParamSpec(name, "str", description, high - low, clauses, low=low, high=high, maker="code", prefix=prefix)


def _bool(name: str, description: str, true_clauses: Sequence[str], false_clauses: Sequence[str]) -> ParamSpec:
    """A boolean parameter; the query states its value with a true or a false phrasing."""
    return ParamSpec(name, "bool", description, 2, tuple(true_clauses), tuple(false_clauses))


PARAMETERS: tuple[ParamSpec, ...] = (
    _vocab("city", "Name of the city.", CITIES, "in {v}", "for {v}", "for the city of {v}"),
    _vocab("from_city", "City of departure.", CITIES, "from {v}", "leaving from {v}"),
    _vocab("to_city", "City of arrival.", CITIES, "to {v}", "going to {v}"),
    _vocab("country", "Name of the country.", COUNTRIES, "in {v}", "for {v}", "for the country {v}"),
    _vocab("country_code", "ISO 3166-1 alpha-2 country code.", COUNTRY_CODES, "with country code {v}",
           "for country code {v}"),
    _vocab("nationality", "Nationality of the traveller.", NATIONALITIES, "for a {v} citizen",
           "for {v} passport holders"),
    _vocab("language", "ISO 639-1 language code, e.g. 'en'.", LANGUAGE_CODES, "in language {v}",
           "with language code {v}"),
    _vocab("source_language", "ISO 639-1 code of the source language.", LANGUAGE_CODES, "from {v}",
           "from language {v}"),
    _vocab("target_language", "ISO 639-1 code of the target language.", LANGUAGE_CODES, "to {v}",
           "into language {v}"),
    _vocab("currency", "Three-letter ISO 4217 currency code.", CURRENCIES, "in {v}", "priced in {v}"),
    _vocab("from_currency", "Currency code to convert from.", CURRENCIES, "from {v}", "from the currency {v}"),
    _vocab("to_currency", "Currency code to convert to.", CURRENCIES, "to {v}", "into {v}"),
    _vocab("symbol", "Stock ticker symbol.", STOCK_SYMBOLS, "for {v}", "for ticker {v}", "for the stock {v}"),
    _vocab("crypto_symbol", "Cryptocurrency symbol.", CRYPTO_SYMBOLS, "for {v}", "for the coin {v}"),
    _vocab("origin", "IATA code of the departure airport.", AIRPORTS, "from {v}", "departing {v}"),
    _vocab("destination", "IATA code of the arrival airport.", AIRPORTS, "to {v}", "arriving at {v}"),
    _made("flight_number", "Airline flight number.", "flight_number", 150000, "for flight {v}",
          "for flight number {v}"),
    _made("date", "Date in YYYY-MM-DD format.", "date", NUM_DAYS, "on {v}", "for {v}", "for the date {v}"),
    _made("start_date", "Start date in YYYY-MM-DD format.", "date", NUM_DAYS, "from {v}", "starting {v}"),
    _made("end_date", "End date in YYYY-MM-DD format.", "date", NUM_DAYS, "to {v}", "until {v}"),
    _made("check_in", "Check-in date in YYYY-MM-DD format.", "date", NUM_DAYS, "checking in on {v}",
          "arriving on {v}"),
    _made("check_out", "Check-out date in YYYY-MM-DD format.", "date", NUM_DAYS, "checking out on {v}",
          "leaving on {v}"),
    _made("time", "Time of day in HH:MM (24-hour) format.", "time", 68, "at {v}", "at the time {v}"),
    _made("wake_time", "Wake-up time in HH:MM (24-hour) format.", "time", 68, "waking up at {v}",
          "with a wake time of {v}"),
    _vocab("timezone", "IANA time zone name.", TIMEZONES, "in time zone {v}", "for the {v} time zone"),
    _vocab("from_timezone", "IANA time zone to convert from.", TIMEZONES, "from {v}", "from time zone {v}"),
    _vocab("to_timezone", "IANA time zone to convert to.", TIMEZONES, "to {v}", "into time zone {v}"),
    _float("latitude", "Latitude in decimal degrees.", -60.0, 70.0, 4, "at latitude {v}", "with latitude {v}"),
    _float("longitude", "Longitude in decimal degrees.", -180.0, 180.0, 4, "and longitude {v}"),
    _float("radius_km", "Search radius in kilometers.", 0.5, 50.0, 1, "within {v} km", "in a radius of {v} km"),
    _made("zip_code", "Five-digit postal code.", "zip_code", 90000, "for ZIP code {v}", "in ZIP {v}"),
    _made("address", "Street address.", "address", 1_000_000, "at {v}", "for the address {v}"),
    _vocab("keyword", "Keyword or phrase to match.", KEYWORDS, "about '{v}'", "matching '{v}'",
           "for the keyword '{v}'"),
    _vocab("query", "Free-text search query.", KEYWORDS, "for '{v}'", "for {v}", "with the query '{v}'"),
    _made("username", "Account username.", "username", 30 * 30 * 990, "for user {v}", "for the account {v}",
          "of @{v}"),
    _int("user_id", "Numeric user identifier.", 1000, 999999, "for user ID {v}", "with user id {v}"),
    _made("email", "Email address.", "email", 30 * 30 * 5, "for {v}", "with the email {v}"),
    _made("recipient", "Email address of the recipient.", "email", 30 * 30 * 5, "to {v}", "addressed to {v}"),
    _made("customer_email", "Email address of the customer.", "email", 30 * 30 * 5, "for customer {v}",
          "billed to {v}"),
    _made("phone_number", "Phone number in international format.", "phone", 64_000_000, "for the number {v}",
          "to {v}"),
    _made("domain", "Domain name.", "domain", 20 * 20 * 8, "for {v}", "for the domain {v}"),
    _made("url", "Full URL.", "url", 3_000_000, "for {v}", "for the link {v}"),
    _made("ip_address", "IPv4 address.", "ip", 254**4, "for IP {v}", "for the address {v}"),
    _made("team", "Name of the team.", "team", len(CITIES) * len(TEAM_MASCOTS), "for the {v}", "for team {v}"),
    _vocab("league", "Name of the league.", LEAGUES, "in the {v}", "for the {v} league"),
    _made("player_name", "Full name of the player.", "person", 900, "for {v}", "for player {v}"),
    _made("season", "Season in YYYY-YYYY format.", "season", 25, "for the {v} season", "in season {v}"),
    _enum("sport", "Sport.", SPORTS, "for {v}", "in {v}"),
    _vocab("genre", "Genre.", GENRES, "in the {v} genre", "with genre {v}"),
    _made("title", "Exact title.", "title", 900, "titled '{v}'", "called '{v}'"),
    _made("author", "Full name of the author.", "person", 900, "by {v}", "written by {v}"),
    _made("artist", "Name of the artist.", "person", 900, "by {v}", "from the artist {v}"),
    _made("playlist_name", "Name of the playlist.", "playlist", 300, "named '{v}'", "called '{v}'"),
    _made("restaurant_name", "Name of the restaurant.", "restaurant", 300, "at {v}", "at the restaurant {v}"),
    _vocab("cuisine", "Type of cuisine.", CUISINES, "serving {v} food", "with {v} cuisine"),
    _vocab("ingredient", "Main ingredient.", INGREDIENTS, "with {v}", "using {v}", "containing {v}"),
    _vocab("food", "Name of the food item.", FOODS, "for {v}", "of {v}"),
    _vocab("dish", "Name of the dish.", DISHES, "for {v}", "to go with {v}"),
    _enum("diet", "Dietary preference.", ("vegetarian", "vegan", "keto", "paleo", "gluten-free"),
          "for a {v} diet", "that are {v}"),
    _vocab("medication", "Name of the medication.", MEDICATIONS, "for {v}", "about {v}"),
    _enum("specialty", "Medical specialty.",
          ("cardiology", "dermatology", "pediatrics", "neurology", "orthopedics", "ophthalmology", "dentistry"),
          "in {v}", "with a {v} specialist"),
    _code("product_id", "Product identifier (SKU).", "SKU-", 5, "for product {v}", "for item {v}"),
    _code("order_id", "Order identifier.", "ORD-", 6, "for order {v}", "with order number {v}"),
    _code("tracking_number", "Carrier tracking number.", "TRK", 9, "with tracking number {v}", "for shipment {v}"),
    _code("account_id", "Account identifier.", "ACC-", 6, "for account {v}", "on account {v}"),
    _code("device_id", "Identifier of the smart device.", "dev-", 4, "on device {v}", "for device {v}"),
    _made("instance_id", "Cloud instance identifier.", "instance_id", 2**32, "for instance {v}",
          "with instance id {v}"),
    _made("server_id", "Server host name.", "server_id", 999, "on server {v}", "from host {v}"),
    _code("isbn", "13-digit ISBN.", "978", 10, "with ISBN {v}", "for ISBN {v}"),
    _made("vin", "17-character vehicle identification number.", "vin", 10**20, "for VIN {v}", "with VIN {v}"),
    _made("api_key", "API key identifier.", "api_key", 2**48, "for API key {v}", "using key {v}"),
    _made("coupon_code", "Coupon code.", "coupon", 55 * 24**4, "for the code {v}", "for coupon {v}"),
    _made("hashtag", "Hashtag without the leading #.", "hashtag", len(KEYWORDS), "for #{v}", "for the hashtag {v}"),
    _vocab("category", "Product category.", ("electronics", "books", "clothing", "home", "garden", "toys",
                                             "sports", "beauty", "grocery", "automotive", "pet supplies",
                                             "office"), "in the {v} category", "in category {v}"),
    _enum("news_category", "News category.",
          ("business", "technology", "sports", "health", "science", "entertainment", "politics"),
          "in the {v} section", "about {v}"),
    _enum("event_category", "Event category.",
          ("music", "theater", "comedy", "food", "sports", "art", "technology", "family"),
          "in the {v} category", "for {v} events"),
    _enum("place_type", "Type of place.",
          ("restaurant", "cafe", "pharmacy", "gas_station", "atm", "park", "museum", "supermarket", "gym"),
          "of type {v}", "that are a {v}"),
    _enum("platform", "Gaming platform.", ("pc", "playstation", "xbox", "switch", "ios", "android"),
          "on {v}", "for the {v} platform"),
    _enum("social_platform", "Social network.", ("twitter", "instagram", "tiktok", "reddit", "github", "youtube"),
          "on {v}", "on the {v} platform"),
    _vocab("programming_language", "Programming language.", PROGRAMMING_LANGUAGES, "written in {v}",
           "in the {v} language"),
    _vocab("job_title", "Job title.", JOB_TITLES, "for {v} roles", "for the position '{v}'"),
    _made("company", "Company name.", "company", 200, "for {v}", "at {v}"),
    _vocab("word", "A single English word.", WORDS, "for the word '{v}'", "of '{v}'"),
    _made("text", "Text to process.", "text", len(TEXTS) * (len(TEXTS) - 1), "for the text '{v}'", "on '{v}'"),
    _vocab("message", "Message body.", MESSAGES, "saying '{v}'", "with the message '{v}'"),
    _made("subject", "Subject line.", "title", 900, "with the subject '{v}'", "titled '{v}'"),
    _vocab("subject_area", "Subject area.", QUIZ_SUBJECTS, "about {v}", "on {v}"),
    _vocab("occasion", "Occasion.", OCCASIONS, "for a {v}", "for the {v}"),
    _vocab("lottery", "Name of the lottery.", LOTTERIES, "for {v}", "for the {v} draw"),
    _enum("zodiac_sign", "Zodiac sign.",
          ("aries", "taurus", "gemini", "cancer", "leo", "virgo", "libra", "scorpio", "sagittarius", "capricorn",
           "aquarius", "pisces"), "for {v}", "for the sign {v}"),
    _vocab("from_unit", "Unit to convert from.", LENGTH_UNITS, "from {v}", "given in {v}"),
    _vocab("to_unit", "Unit to convert to.", LENGTH_UNITS, "to {v}", "into {v}"),
    _enum("from_scale", "Temperature scale to convert from.", ("celsius", "fahrenheit", "kelvin"), "from {v}",
          "given in {v}"),
    _enum("to_scale", "Temperature scale to convert to.", ("celsius", "fahrenheit", "kelvin"), "to {v}",
          "into {v}"),
    _made("expression", "Arithmetic expression.", "expression", 4 * 98 * 98 * 18, "for '{v}'",
          "for the expression {v}"),
    _enum("units", "Unit system.", ("metric", "imperial"), "in {v} units", "using {v} units"),
    _enum("sort_by", "Sort key.", ("relevance", "price", "rating", "date", "popularity"), "sorted by {v}",
          "ordered by {v}"),
    _enum("order", "Sort direction.", ("ascending", "descending"), "in {v} order"),
    _enum("format", "Output format.", ("json", "csv", "xml", "pdf"), "as {v}", "in {v} format"),
    _enum("period", "Aggregation period.", ("daily", "weekly", "monthly", "quarterly", "yearly"),
          "on a {v} basis", "with {v} granularity"),
    _enum("cabin_class", "Cabin class.", ("economy", "premium", "business", "first"), "in {v} class",
          "flying {v} class"),
    _enum("car_class", "Rental car class.", ("compact", "midsize", "fullsize", "suv", "van"),
          "for a {v} car", "in the {v} class"),
    _enum("room_type", "Room type.", ("single", "double", "twin", "suite"), "for a {v} room",
          "with a {v} room"),
    _enum("property_type", "Property type.", ("apartment", "house", "condo", "townhouse", "studio"),
          "of type {v}", "that are a {v}"),
    _enum("activity_level", "Physical activity level.",
          ("sedentary", "light", "moderate", "active", "very_active"), "with a {v} activity level",
          "at activity level {v}"),
    _enum("gender", "Biological sex used by the formula.", ("male", "female"), "for a {v}",
          "with gender {v}"),
    _enum("goal", "Training goal.", ("weight_loss", "muscle_gain", "endurance", "flexibility"),
          "with the goal {v}", "aimed at {v}"),
    _enum("difficulty", "Difficulty level.", ("easy", "medium", "hard"), "at {v} difficulty",
          "with difficulty {v}"),
    _enum("level", "Skill level.", ("beginner", "intermediate", "advanced"), "at {v} level", "for {v} learners"),
    _enum("priority", "Priority.", ("low", "medium", "high", "urgent"), "with {v} priority",
          "marked as {v} priority"),
    _enum("mode", "Mode of transport.", ("driving", "walking", "cycling", "transit"), "by {v}",
          "using {v} mode"),
    _enum("fuel_type", "Fuel type.", ("regular", "premium", "diesel", "e85"), "for {v} fuel", "for {v}"),
    _enum("animal_type", "Kind of animal.", ("dog", "cat", "rabbit", "bird", "hamster"), "for a {v}",
          "looking for a {v}"),
    _enum("record_type", "DNS record type.", ("A", "AAAA", "MX", "TXT", "CNAME", "NS"), "of type {v}",
          "for {v} records"),
    _enum("algorithm", "Hash algorithm.", ("md5", "sha1", "sha256", "sha512"), "using {v}", "with {v}"),
    _enum("reason", "Reason for the return.", ("damaged", "wrong_item", "too_small", "too_large",
                                               "changed_mind"), "because it is {v}", "with reason {v}"),
    _enum("exchange", "Stock exchange.", ("NASDAQ", "NYSE", "LSE", "TSE", "XETRA"), "on the {v} exchange",
          "listed on {v}"),
    _enum("room", "Room of the home.", ("living_room", "bedroom", "kitchen", "office", "bathroom"),
          "in the {v}", "for the {v}"),
    _enum("status", "Status filter.", ("open", "pending", "closed"), "with status {v}", "that are {v}"),
    _int("limit", "Maximum number of results.", 2, 100, "limited to {v} results",
         "returning at most {v} results", "with a limit of {v}"),
    _int("page", "Page number of the results.", 1, 50, "on page {v}", "showing page {v}"),
    _int("days", "Number of days.", 1, 14, "for the next {v} days", "covering {v} days"),
    _int("trip_days", "Length of the trip in days.", 1, 21, "for {v} days", "lasting {v} days"),
    _int("year", "Four-digit year.", 1990, 2030, "for {v}", "in the year {v}"),
    _int("month", "Month number (1-12).", 1, 12, "for month {v}", "in month {v}"),
    _int("passengers", "Number of passengers.", 1, 9, "for {v} passengers", "with {v} travellers"),
    _int("guests", "Number of guests.", 1, 10, "for {v} guests", "for a party of {v}"),
    _int("quantity", "Number of items.", 1, 20, "with quantity {v}", "for {v} items"),
    _int("count", "How many to produce.", 1, 25, "with a count of {v}", "producing {v} of them"),
    _int("age", "Age in years.", 18, 90, "aged {v}", "for age {v}"),
    _int("bedrooms", "Number of bedrooms.", 1, 6, "with {v} bedrooms", "having {v} bedrooms"),
    _int("years", "Duration in years.", 1, 40, "over {v} years", "for a term of {v} years"),
    _int("years_experience", "Years of professional experience.", 0, 40, "with {v} years of experience",
         "having {v} years of experience"),
    _int("length", "Number of characters.", 8, 64, "of length {v}", "with {v} characters"),
    _int("size_px", "Image size in pixels.", 100, 1000, "at {v} pixels", "with size {v} px"),
    _int("season_number", "Season number.", 1, 15, "for season {v}", "from season {v}"),
    _int("route_number", "Bus route number.", 1, 999, "for route {v}", "on bus route {v}"),
    _int("resting_heart_rate", "Resting heart rate in beats per minute.", 40, 100,
         "with a resting heart rate of {v}", "at {v} resting bpm"),
    _int("duration_minutes", "Duration in minutes.", 15, 240, "lasting {v} minutes", "for {v} minutes"),
    _int("max_calories", "Maximum calories per serving.", 200, 1500, "under {v} calories",
         "with at most {v} calories"),
    _int("grams", "Amount in grams.", 10, 500, "for {v} grams", "in a {v} g portion"),
    _int("capacity", "Number of people.", 2, 50, "for {v} people", "seating {v}"),
    _int("brightness", "Brightness in percent (0-100).", 0, 100, "at {v} percent brightness",
         "with brightness {v}"),
    _int("post_id", "Numeric post identifier.", 1_000_000, 9_999_999, "on post {v}", "for post ID {v}"),
    _int("min_salary", "Minimum yearly salary.", 20000, 250000, "paying at least {v}",
         "with a minimum salary of {v}", step=1000),
    _int("max_budget", "Maximum budget.", 100000, 2000000, "under {v}", "with a budget of {v}", step=5000),
    _int("min_value", "Lower bound (inclusive).", 0, 1000, "from {v}", "between {v}"),
    _int("max_value", "Upper bound (inclusive).", 1001, 100000, "to {v}", "and {v}"),
    _float("amount", "Monetary amount.", 1.0, 10000.0, 2, "for an amount of {v}", "for {v}"),
    _float("principal", "Principal amount.", 1000.0, 900000.0, 2, "for a principal of {v}",
           "on a loan of {v}"),
    _float("down_payment", "Down payment amount.", 0.0, 200000.0, 2, "with a down payment of {v}",
           "putting {v} down"),
    _float("interest_rate", "Annual interest rate in percent.", 0.5, 15.0, 2, "at an interest rate of {v}%",
           "at {v} percent interest"),
    _float("tip_percentage", "Tip in percent.", 5.0, 30.0, 1, "with a {v}% tip", "tipping {v} percent"),
    _float("income", "Yearly income.", 15000.0, 500000.0, 2, "with an income of {v}", "earning {v} a year"),
    _float("weight_kg", "Weight in kilograms.", 3.0, 150.0, 1, "weighing {v} kg", "with a weight of {v} kg"),
    _float("height_cm", "Height in centimeters.", 120.0, 210.0, 1, "with a height of {v} cm",
           "standing {v} cm tall"),
    _float("min_rating", "Minimum rating (1-5).", 1.0, 5.0, 1, "rated at least {v}",
           "with a rating of {v} or more"),
    _float("max_price", "Maximum price.", 5.0, 5000.0, 2, "under {v}", "costing at most {v}"),
    _float("min_magnitude", "Minimum magnitude.", 2.0, 8.0, 1, "of magnitude {v} or more",
           "above magnitude {v}"),
    _float("value", "Value to convert.", 0.1, 10000.0, 2, "for {v}", "for a value of {v}"),
    _float("temperature", "Temperature value.", -40.0, 120.0, 1, "for {v} degrees", "of {v} degrees"),
    _float("target_temperature", "Target temperature in degrees Celsius.", 10.0, 30.0, 1,
           "to {v} degrees", "at {v} degrees"),
    _bool("hourly", "Whether to include the hourly breakdown.", ("with an hourly breakdown",),
          ("without the hourly breakdown",)),
    _bool("include_details", "Whether to include all details.", ("including full details",),
          ("without extra details",)),
    _bool("include_images", "Whether to include images.", ("with images", "including images"),
          ("without images", "excluding images")),
    _bool("direct_only", "Whether to return only direct flights.", ("direct flights only",),
          ("including connecting flights",)),
    _bool("refundable_only", "Whether to return only refundable options.", ("refundable only",),
          ("including non-refundable options",)),
    _bool("open_now", "Whether to return only places that are open now.", ("that are open now",),
          ("whether or not they are open now",)),
    _bool("remote_only", "Whether to return only remote positions.", ("remote only",),
          ("including on-site positions",)),
    _bool("include_symbols", "Whether to include symbols.", ("including symbols",), ("without symbols",)),
    _bool("public", "Whether it is public.", ("as a public one",), ("as a private one",)),
    _bool("notify", "Whether to send notifications.", ("with notifications on",),
          ("with notifications off",)),
    _bool("adjusted", "Whether prices are adjusted for splits.", ("adjusted for splits",),
          ("without split adjustment",)),
    _bool("safe_search", "Whether safe search is on.", ("with safe search on",), ("with safe search off",)),
    _bool("include_metadata", "Whether to include metadata.", ("including metadata",),
          ("without metadata",)),
    _bool("available_only", "Whether to return only items in stock.", ("in stock only",),
          ("including out-of-stock items",)),
)

PARAMS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}
if len(PARAMS) != len(PARAMETERS):
    raise AssertionError("duplicate parameter names in the vocabulary")

# Parameters that read naturally only in this order: a template keeps each pair together, in order, and states the
# second with the phrasing of the same index as the first ("from X to Y", "between X and Y").
ORDERED_PAIRS = {
    "start_date": "end_date", "check_in": "check_out", "origin": "destination", "from_city": "to_city",
    "from_currency": "to_currency", "source_language": "target_language", "from_unit": "to_unit",
    "from_scale": "to_scale", "from_timezone": "to_timezone", "latitude": "longitude", "min_value": "max_value",
}

# ---------------------------------------------------------------------------------------------------------------
# Verbs, qualifiers and domain objects that compose the tool names
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verb:
    """The first word of a tool name: how its description starts, how a query asks for it, what it adds."""

    describe: str
    actions: tuple[str, ...]
    required: tuple[str, ...] = ()
    optional: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Qualifier:
    """An optional name suffix (`_history`, `_summary`, ...) with the verbs it fits and the parameters it changes."""

    phrase: str
    describe: str
    verbs: frozenset[str]
    required: tuple[str, ...] = ()
    optional: tuple[tuple[str, Any], ...] = ()
    drops: tuple[str, ...] = ()


@dataclass(frozen=True)
class DomainObject:
    """The middle of a tool name: a thing the tool acts on, with its own parameters and the verbs that fit it."""

    key: str
    phrase: str
    describe: str
    required: tuple[str, ...]
    optional: tuple[tuple[str, Any], ...]
    verbs: tuple[str, ...]
    qualifiers: tuple[str, ...] = ()


VERBS: dict[str, Verb] = {
    "get": Verb("Retrieves", ("get {o}", "fetch {o}", "show me {o}", "look up {o}")),
    "fetch": Verb("Fetches", ("fetch {o}", "pull up {o}", "retrieve {o}")),
    "search": Verb("Searches for", ("search for {o}", "look for {o}", "find {o}"), optional=(("limit", 10),)),
    "list": Verb("Lists", ("list {o}", "show all {o}", "give me a list of {o}"), optional=(("limit", 20),)),
    "find": Verb("Finds", ("find {o}", "locate {o}", "track down {o}")),
    "lookup": Verb("Looks up", ("look up {o}", "do a lookup of {o}")),
    "calculate": Verb("Calculates", ("calculate {o}", "compute {o}", "work out {o}")),
    "estimate": Verb("Estimates", ("estimate {o}", "give me an estimate of {o}", "roughly estimate {o}")),
    "convert": Verb("Converts", ("convert {o}", "do a conversion of {o}")),
    "check": Verb("Checks", ("check {o}", "verify {o}", "run a check on {o}")),
    "validate": Verb("Validates", ("validate {o}", "check the validity of {o}")),
    "verify": Verb("Verifies", ("verify {o}", "confirm {o}")),
    "track": Verb("Tracks", ("track {o}", "keep track of {o}", "follow {o}")),
    "monitor": Verb("Monitors", ("monitor {o}", "keep an eye on {o}", "watch {o}")),
    "generate": Verb("Generates", ("generate {o}", "create {o}", "make {o}")),
    "create": Verb("Creates", ("create {o}", "set up {o}", "add {o}")),
    "update": Verb("Updates", ("update {o}", "modify {o}", "change {o}")),
    "delete": Verb("Deletes", ("delete {o}", "remove {o}")),
    "cancel": Verb("Cancels", ("cancel {o}", "call off {o}")),
    "book": Verb("Books", ("book {o}", "reserve {o}")),
    "schedule": Verb("Schedules", ("schedule {o}", "plan {o}")),
    "send": Verb("Sends", ("send {o}", "deliver {o}")),
    "set": Verb("Sets", ("set {o}", "set up {o}")),
    "plan": Verb("Plans", ("plan {o}", "map out {o}")),
    "analyze": Verb("Analyzes", ("analyze {o}", "run an analysis of {o}", "break down {o}")),
    "summarize": Verb("Summarizes", ("summarize {o}", "give me a summary of {o}")),
    "recommend": Verb("Recommends", ("recommend {o}", "suggest {o}")),
    "predict": Verb("Predicts", ("predict {o}", "forecast {o}")),
    "compare": Verb("Compares", ("compare {o}", "do a comparison of {o}")),
    "export": Verb("Exports", ("export {o}", "download {o}"), optional=(("format", "csv"),)),
    "translate": Verb("Translates", ("translate {o}",), required=("source_language", "target_language")),
    "count": Verb("Counts", ("count {o}", "tell me the number of {o}")),
}

QUALIFIERS: dict[str, Qualifier] = {
    "history": Qualifier(" history", " over a date range", frozenset({"get", "fetch", "analyze", "export"}),
                         required=("start_date", "end_date"), drops=("date",)),
    "summary": Qualifier(" summary", " as a summary", frozenset({"get", "fetch", "generate"}), required=("period",)),
    "details": Qualifier(" details", " with every available field", frozenset({"get", "fetch"}),
                         optional=(("include_metadata", False),)),
    "report": Qualifier(" report", " as a report", frozenset({"get", "generate", "export"}), required=("format",)),
    "trends": Qualifier(" trends", " as trends over time", frozenset({"get", "analyze", "predict"}),
                        required=("period",)),
    "by_country": Qualifier(" by country", " for one country", frozenset({"get", "list", "compare"}),
                            required=("country",)),
    "by_date": Qualifier(" for a given date", " for a given date", frozenset({"get", "list", "fetch"}),
                         required=("date",)),
}


def _obj(key: str, phrase: str, describe: str, required: str, optional: dict[str, Any] | None, verbs: str,
         qualifiers: str = "") -> DomainObject:
    """Compact constructor: parameter, verb and qualifier lists are space-separated names."""
    return DomainObject(key, phrase, describe, tuple(required.split()), tuple((optional or {}).items()),
                        tuple(verbs.split()), tuple(qualifiers.split()))


DOMAIN_OBJECTS: tuple[DomainObject, ...] = (
    # weather and environment
    _obj("weather_forecast", "the weather forecast", "the weather forecast for a city on a given date",
         "city date", {"units": "metric", "hourly": False}, "get fetch predict", "summary details"),
    _obj("current_weather", "the current weather", "the current weather at a geographic position",
         "latitude longitude", {"units": "metric"}, "get fetch check", "details"),
    _obj("air_quality", "the air quality", "the air quality index of a city on a given date", "city date",
         {"include_details": False}, "get check monitor predict", "history trends"),
    _obj("uv_index", "the UV index", "the UV index at a geographic position on a given date",
         "latitude longitude date", None, "get check predict"),
    _obj("pollen_count", "the pollen count", "the pollen count for a postal code on a given date", "zip_code date",
         None, "get check predict"),
    _obj("sunrise_sunset_times", "the sunrise and sunset times", "sunrise and sunset times for a position and date",
         "latitude longitude date", {"timezone": "Europe/London"}, "get calculate fetch"),
    _obj("tide_times", "the tide times", "high and low tide times for a coastal city", "city date", None,
         "get fetch predict"),
    _obj("earthquakes", "recent earthquakes", "recent earthquakes in a country above a magnitude",
         "country min_magnitude", {"limit": 10}, "list get monitor", "history"),
    # travel
    _obj("flights", "flights", "flights between two airports on a date", "origin destination date",
         {"passengers": 1, "cabin_class": "economy", "direct_only": False}, "search find list compare book"),
    _obj("flight_status", "the flight status", "the live status of a flight", "flight_number date", None,
         "get check track monitor"),
    _obj("hotels", "hotels", "hotels in a city for a stay", "city check_in check_out",
         {"guests": 2, "max_price": 250.0, "min_rating": 3.5}, "search find list book recommend"),
    _obj("car_rentals", "car rentals", "rental cars available in a city", "city start_date end_date",
         {"car_class": "compact"}, "search find book compare"),
    _obj("train_tickets", "train tickets", "train tickets between two cities", "from_city to_city date",
         {"passengers": 1, "refundable_only": False}, "search book find"),
    _obj("restaurants", "restaurants", "restaurants in a city by cuisine", "city cuisine",
         {"min_rating": 4.0, "open_now": False}, "search find recommend list"),
    _obj("restaurant_table", "a restaurant table", "a table at a restaurant", "restaurant_name date time guests",
         None, "book cancel check"),
    _obj("tourist_attractions", "tourist attractions", "tourist attractions around a city",
         "city radius_km", {"limit": 10}, "list find recommend search"),
    _obj("visa_requirements", "the visa requirements", "visa requirements for travellers of a nationality",
         "country nationality", {"language": "en"}, "get check"),
    _obj("travel_insurance_quote", "a travel insurance quote", "a travel insurance quote for a trip",
         "country start_date end_date age", None, "get estimate compare"),
    _obj("trip_itinerary", "a trip itinerary", "a day-by-day itinerary for a trip", "city trip_days",
         {"max_price": 1500.0}, "generate create update"),
    _obj("route", "a route", "a route between two cities", "from_city to_city mode", {"units": "metric"},
         "plan get find"),
    _obj("travel_time", "the travel time", "the travel time between two cities", "from_city to_city mode", None,
         "estimate calculate get"),
    _obj("distance", "the distance", "the distance between two cities", "from_city to_city", {"units": "metric"},
         "calculate get estimate"),
    _obj("local_time", "the local time", "the local time in a city on a given date", "city date",
         {"timezone": "Europe/London"}, "get fetch"),
    _obj("parking_spots", "parking spots", "parking spots in a city", "city date", {"radius_km": 2.0},
         "find search book"),
    # finance
    _obj("currency", "currency", "an amount of money between currencies", "amount from_currency to_currency",
         None, "convert"),
    _obj("exchange_rate", "the exchange rate", "the exchange rate between two currencies on a date",
         "from_currency to_currency date", None, "get fetch track predict monitor", "history"),
    _obj("stock_price", "the stock price", "the price of a stock on a trading day", "symbol date",
         {"exchange": "NASDAQ", "adjusted": True}, "get fetch predict track monitor", "history summary"),
    _obj("stock_news", "stock news", "news articles about a stock", "symbol date", {"limit": 10},
         "get fetch summarize"),
    _obj("crypto_price", "the crypto price", "the price of a cryptocurrency in a currency",
         "crypto_symbol currency date", None, "get fetch track predict", "history"),
    _obj("company_financials", "the company financials", "the financial statements of a company",
         "company year", {"period": "yearly"}, "get fetch analyze summarize export", "report"),
    _obj("loan_payment", "the loan payment", "the monthly payment of a loan", "principal interest_rate years",
         None, "calculate estimate"),
    _obj("mortgage_payment", "the mortgage payment", "the monthly payment of a mortgage",
         "principal interest_rate years", {"down_payment": 0.0}, "calculate estimate compare"),
    _obj("compound_interest", "the compound interest", "the compound interest earned on a principal",
         "principal interest_rate years", {"period": "yearly"}, "calculate"),
    _obj("retirement_savings", "the retirement savings", "the savings reached at retirement",
         "age income interest_rate", None, "estimate calculate predict"),
    _obj("income_tax", "the income tax", "the income tax owed in a country for a year", "income country year",
         None, "calculate estimate"),
    _obj("sales_tax", "the sales tax", "the sales tax on an amount for a postal code", "amount zip_code", None,
         "calculate get"),
    _obj("tip_amount", "the tip amount", "the tip for a bill", "amount tip_percentage", {"guests": 1},
         "calculate"),
    _obj("invoice", "an invoice", "an invoice for a customer", "customer_email amount currency date", None,
         "create send update cancel generate"),
    _obj("expense", "an expense", "an expense entry in a budget", "amount category date",
         {"currency": "USD"}, "create track update delete", "report summary"),
    _obj("credit_score", "the credit score", "the credit score of a user", "user_id date", None,
         "get check monitor"),
    _obj("bank_transactions", "the bank transactions", "bank transactions of an account in a date range",
         "account_id start_date end_date", {"limit": 50}, "list fetch export analyze search", "summary"),
    # health, fitness and food
    _obj("bmi", "the BMI", "the body mass index from weight and height", "weight_kg height_cm", None,
         "calculate"),
    _obj("daily_calories", "the daily calorie needs", "the daily calorie needs of a person",
         "age gender weight_kg height_cm activity_level", None, "calculate estimate"),
    _obj("water_intake", "the daily water intake", "the recommended daily water intake",
         "weight_kg activity_level", {"units": "metric"}, "calculate estimate"),
    _obj("workout_plan", "a workout plan", "a weekly workout plan", "goal days difficulty", {"duration_minutes": 45},
         "generate create recommend update"),
    _obj("recipes", "recipes", "recipes by ingredient and cuisine", "ingredient cuisine",
         {"diet": "vegetarian", "max_calories": 800}, "search find recommend list"),
    _obj("nutrition_facts", "the nutrition facts", "the nutrition facts of a food portion", "food grams", None,
         "get fetch calculate analyze"),
    _obj("heart_rate_zones", "the heart rate zones", "training heart rate zones", "age resting_heart_rate", None,
         "calculate get"),
    _obj("sleep_schedule", "a sleep schedule", "a sleep schedule for a wake-up time", "wake_time age", None,
         "generate calculate recommend"),
    _obj("doctor_appointment", "a doctor appointment", "an appointment with a doctor", "specialty date time",
         {"notify": True}, "book cancel schedule"),
    _obj("pharmacies", "pharmacies", "pharmacies around a postal code", "zip_code radius_km", {"open_now": False},
         "find list search"),
    _obj("medication_info", "the medication info", "dosage and safety information of a medication",
         "medication age", {"language": "en"}, "get fetch check"),
    # sports
    _obj("match_results", "the match results", "results of a team's matches on a date", "team date", None,
         "get fetch list", "summary"),
    _obj("team_standings", "the team standings", "the standings of a league in a season", "league season",
         {"limit": 20}, "get fetch list predict"),
    _obj("player_stats", "the player stats", "the statistics of a player in a season", "player_name season",
         {"league": "NBA"}, "get fetch analyze compare", "summary"),
    _obj("league_schedule", "the league schedule", "the fixtures of a league in a date range",
         "league start_date end_date", None, "get fetch list export"),
    _obj("live_scores", "the live scores", "live scores of a sport on a date", "sport date", None,
         "get fetch track monitor"),
    _obj("betting_odds", "the betting odds", "betting odds for a team's match", "sport team date", None,
         "get fetch compare track"),
    # media and entertainment
    _obj("movies", "movies", "movies by genre and release year", "genre year", {"min_rating": 3.0},
         "search find recommend list"),
    _obj("movie_details", "the movie details", "details of a movie", "title year", {"language": "en"},
         "get fetch"),
    _obj("tv_show_episodes", "the TV show episodes", "the episodes of a TV show season", "title season_number",
         None, "list get fetch"),
    _obj("song_lyrics", "the song lyrics", "the lyrics of a song", "title artist", None, "get fetch search"),
    _obj("playlist", "a playlist", "a music playlist", "playlist_name genre", {"public": False},
         "create generate update delete"),
    _obj("podcast_episodes", "podcast episodes", "recent episodes of a podcast", "title limit", None,
         "list search fetch summarize"),
    _obj("books", "books", "books by an author in a genre", "author genre", {"limit": 10},
         "search find recommend list"),
    _obj("book_details", "the book details", "details of a book by ISBN", "isbn", None, "get fetch check"),
    _obj("news_headlines", "the news headlines", "top news headlines of a country", "country news_category date",
         None, "get fetch summarize list", "summary"),
    _obj("news_articles", "news articles", "news articles matching a keyword in a date range",
         "keyword start_date end_date", {"language": "en", "limit": 20}, "search fetch summarize analyze"),
    _obj("concerts", "concerts", "upcoming concerts of an artist in a city", "artist city", None,
         "find search list"),
    _obj("concert_tickets", "concert tickets", "tickets for a concert", "artist city date quantity", None,
         "book find search"),
    _obj("events", "events", "events in a city on a date", "city date", {"event_category": "music"},
         "find search list recommend"),
    _obj("video_games", "video games", "video games by platform and genre", "platform genre", {"year": 2024},
         "search recommend list find"),
    _obj("trivia_questions", "trivia questions", "trivia questions on a subject", "subject_area difficulty count",
         {"language": "en"}, "get generate fetch"),
    _obj("horoscope", "the horoscope", "the horoscope of a zodiac sign for a date", "zodiac_sign date", None,
         "get fetch"),
    _obj("lottery_results", "the lottery results", "the winning numbers of a lottery draw", "lottery date", None,
         "get check fetch"),
    # shopping
    _obj("products", "products", "products by keyword and category", "keyword category",
         {"max_price": 100.0, "sort_by": "relevance"}, "search find list compare recommend", "by_country"),
    _obj("product_reviews", "the product reviews", "customer reviews of a product", "product_id",
         {"limit": 20, "min_rating": 1.0, "sort_by": "date"}, "get fetch list summarize analyze"),
    _obj("product_details", "the product details", "details of a product", "product_id currency",
         {"include_images": True}, "get fetch update"),
    _obj("price_history", "the price history", "the price history of a product", "product_id start_date end_date",
         {"currency": "USD"}, "get fetch track analyze"),
    _obj("order_status", "the order status", "the status of an order", "order_id", {"include_details": False},
         "get check track", "details"),
    _obj("order", "an order", "an order for a product", "product_id quantity address", None,
         "create cancel update track"),
    _obj("shipping_cost", "the shipping cost", "the cost of shipping a parcel", "weight_kg country zip_code",
         None, "calculate estimate compare get"),
    _obj("coupon_code", "the coupon code", "a coupon code", "coupon_code product_id", None, "validate check"),
    _obj("store_locations", "store locations", "store locations around a city", "city radius_km",
         {"open_now": False}, "find list search"),
    _obj("inventory", "the inventory", "the stock level of a product in a city", "product_id city",
         {"available_only": False}, "check get update track monitor"),
    _obj("return_request", "a return request", "a return request for an order", "order_id reason", None,
         "create cancel track"),
    _obj("shipment_status", "the shipment status", "the status of a shipment", "tracking_number",
         {"include_details": False}, "track get check"),
    # social and communication
    _obj("user_profile", "the user profile", "the profile of a user on a social network",
         "username social_platform", {"include_details": False}, "get fetch update"),
    _obj("user_followers", "the user followers", "the followers of a user", "username limit", None,
         "get list fetch count analyze"),
    _obj("user_posts", "the user posts", "recent posts of a user", "username limit", {"start_date": "2024-01-01"},
         "get list fetch analyze summarize export"),
    _obj("trending_hashtags", "the trending hashtags", "trending hashtags in a country on a date",
         "country date", {"limit": 10}, "get fetch list track analyze predict"),
    _obj("hashtag_posts", "the hashtag posts", "posts that use a hashtag", "hashtag limit",
         {"social_platform": "instagram"}, "get search fetch analyze count"),
    _obj("comments", "the comments", "comments on a post", "post_id limit", {"sort_by": "date"},
         "list get fetch analyze summarize"),
    _obj("email", "an email", "an email message", "recipient subject message", None, "send schedule"),
    _obj("sms_message", "an SMS message", "a text message", "phone_number message", None, "send schedule"),
    _obj("calendar_event", "a calendar event", "an event in the calendar", "subject date time",
         {"duration_minutes": 60, "notify": True}, "create update delete cancel schedule"),
    _obj("reminder", "a reminder", "a reminder", "message date time", {"notify": True},
         "set create delete update"),
    _obj("meeting_slots", "meeting slots", "free meeting slots with a participant", "email date duration_minutes",
         None, "find list"),
    _obj("support_ticket", "a support ticket", "a customer support ticket", "customer_email subject priority",
         None, "create update delete"),
    # developer and web tools
    _obj("domain_availability", "the domain availability", "whether a domain name is available", "domain",
         {"include_details": False}, "check"),
    _obj("whois_record", "the WHOIS record", "the WHOIS record of a domain", "domain", {"include_metadata": False},
         "get fetch check"),
    _obj("dns_records", "the DNS records", "the DNS records of a domain", "domain record_type", None,
         "get fetch check list update"),
    _obj("ip_geolocation", "the IP geolocation", "the location of an IP address", "ip_address",
         {"language": "en"}, "get fetch lookup"),
    _obj("ssl_certificate", "the SSL certificate", "the SSL certificate of a domain", "domain",
         {"include_details": False}, "check get validate monitor"),
    _obj("website_status", "the website status", "whether a website is up", "url", {"include_details": False},
         "check monitor get"),
    _obj("password", "a password", "a random password", "length count", {"include_symbols": True}, "generate"),
    _obj("qr_code", "a QR code", "a QR code for a link", "url size_px", None, "generate create"),
    _obj("short_url", "a short URL", "a short link for a URL", "url", {"public": True},
         "create generate delete track"),
    _obj("email_address", "the email address", "an email address", "email", None, "validate verify"),
    _obj("phone_number", "the phone number", "a phone number", "phone_number country_code", None,
         "validate verify lookup"),
    _obj("code_repositories", "code repositories", "public code repositories", "keyword programming_language",
         {"sort_by": "popularity", "limit": 10}, "search list find"),
    _obj("api_usage", "the API usage", "the usage of an API key in a date range", "api_key start_date end_date",
         None, "get track monitor export summarize"),
    _obj("server_logs", "the server logs", "the logs of a server in a date range", "server_id start_date end_date",
         {"status": "open"}, "fetch search analyze export summarize"),
    _obj("cloud_instance", "the cloud instance", "a cloud compute instance", "instance_id country_code", None,
         "create delete update monitor get"),
    _obj("text_hash", "the text hash", "the hash of a text", "text algorithm", {"include_metadata": False},
         "generate calculate"),
    # places and geography
    _obj("nearby_places", "nearby places", "places around a geographic position", "latitude longitude place_type",
         {"radius_km": 1.0, "limit": 10}, "find search list recommend"),
    _obj("address_coordinates", "the address coordinates", "the coordinates of a street address",
         "address city", None, "get lookup fetch"),
    _obj("zip_code_info", "the ZIP code info", "information about a postal code", "zip_code", None,
         "get lookup fetch"),
    _obj("country_statistics", "the country statistics", "economic and population statistics of a country",
         "country year", {"currency": "USD"}, "get fetch compare analyze", "report summary"),
    _obj("city_population", "the city population", "the population of a city in a year", "city year",
         {"include_details": False}, "get estimate predict"),
    _obj("elevation", "the elevation", "the elevation of a geographic position", "latitude longitude",
         {"units": "metric"}, "get fetch calculate"),
    _obj("public_holidays", "the public holidays", "the public holidays of a country in a year", "country year",
         {"language": "en"}, "list get fetch check"),
    # language and education
    _obj("text", "the text", "a piece of text", "text", {"language": "en"}, "translate summarize analyze"),
    _obj("word_definition", "the word definition", "the dictionary definition of a word", "word",
         {"language": "en", "include_details": False}, "get fetch lookup"),
    _obj("synonyms", "synonyms", "synonyms of a word", "word limit", None, "get find fetch list"),
    _obj("grammar_errors", "grammar errors", "grammar errors in a text", "text language", None, "check find"),
    _obj("quiz_questions", "quiz questions", "quiz questions for students", "subject_area level count",
         {"language": "en"}, "generate get create"),
    _obj("math_expression", "the math expression", "an arithmetic expression", "expression", None,
         "calculate validate"),
    _obj("units", "units", "a length between units", "value from_unit to_unit", None, "convert"),
    _obj("temperature", "the temperature", "a temperature between scales", "temperature from_scale to_scale",
         None, "convert"),
    _obj("time_zone", "a time between time zones", "a time of day between time zones",
         "time from_timezone to_timezone", None, "convert"),
    _obj("university_rankings", "the university rankings", "university rankings of a country", "country year",
         {"limit": 20}, "get fetch list compare"),
    _obj("online_courses", "online courses", "online courses on a topic", "keyword level", {"limit": 10},
         "search find recommend list"),
    # jobs and business
    _obj("job_listings", "job listings", "open positions for a job title in a city", "job_title city",
         {"remote_only": False, "min_salary": 50000}, "search find list recommend"),
    _obj("salary_estimate", "the salary estimate", "the expected salary for a role", "job_title city years_experience",
         None, "get calculate estimate compare"),
    _obj("company_profile", "the company profile", "the profile of a company in a country", "company country",
         {"include_details": False}, "get fetch analyze summarize"),
    _obj("company_reviews", "the company reviews", "employee reviews of a company", "company limit",
         {"min_rating": 1.0}, "get fetch summarize analyze"),
    _obj("meeting_room", "a meeting room", "a meeting room for a group", "city date time capacity", None,
         "book cancel find"),
    # home, property and vehicles
    _obj("property_listings", "property listings", "properties for sale in a city", "city max_budget bedrooms",
         {"property_type": "apartment"}, "search find list recommend"),
    _obj("rental_prices", "the rental prices", "typical rents in a city", "city bedrooms",
         {"property_type": "apartment", "currency": "USD"},
         "get estimate compare analyze predict", "history trends"),
    _obj("home_value", "the home value", "the market value of a home", "address zip_code", None,
         "estimate get predict"),
    _obj("energy_usage", "the energy usage", "the energy usage of an account in a date range",
         "account_id start_date end_date", {"period": "daily"}, "get analyze track monitor export"),
    _obj("electricity_price", "the electricity price", "the electricity price for a postal code on a date",
         "zip_code date", None, "get fetch predict compare"),
    _obj("thermostat_temperature", "the thermostat temperature", "the target temperature of a smart thermostat",
         "device_id target_temperature", {"room": "living_room"}, "set update get monitor"),
    _obj("smart_lights", "the smart lights", "the smart lights of a room", "device_id room brightness", None,
         "set update"),
    _obj("fuel_prices", "the fuel prices", "fuel prices in a city on a date", "city fuel_type date", None,
         "get compare track fetch"),
    _obj("vehicle_info", "the vehicle info", "vehicle details from a VIN", "vin", None, "get lookup validate"),
    _obj("ev_charging_stations", "EV charging stations", "charging stations around a position",
         "latitude longitude radius_km", {"limit": 10}, "find list search"),
    _obj("traffic_conditions", "the traffic conditions", "traffic conditions in a city", "city date time", None,
         "get check monitor predict"),
    _obj("bus_schedule", "the bus schedule", "the timetable of a bus route", "route_number city date", None,
         "get fetch list"),
    # everything else
    _obj("random_number", "a random number", "random integers in a range", "min_value max_value count", None,
         "generate"),
    _obj("gift_ideas", "gift ideas", "gift ideas for an occasion", "occasion age max_price", None,
         "recommend generate find search"),
    _obj("adoptable_pets", "adoptable pets", "pets available for adoption", "animal_type zip_code",
         {"radius_km": 25.0}, "search find list"),
    _obj("wine_pairings", "wine pairings", "wines that pair with a dish", "dish max_price", None,
         "recommend get find"),
    _obj("color_palette", "a color palette", "a color palette from a keyword", "keyword count",
         {"format": "json", "include_metadata": False}, "generate create"),
    _obj("username_availability", "the username availability", "whether a username is free on a platform",
         "username social_platform", None, "check"),
)


@dataclass(frozen=True)
class Scope:
    """A name suffix of the catalog's extension (ranks past 400): where the tool acts, said in its query and its
    description, so a scoped tool's query differs from its unscoped one's."""

    phrase: str
    describe: str


# The extension scopes (synthetic_xlam: one tool per domain object and scope, ranked after the first 400).
SCOPES: dict[str, Scope] = {
    "team": Scope(" for the team workspace", " in a team workspace"),
    "staging": Scope(" in the staging environment", " in the staging environment"),
    "archive": Scope(" from the archive", " from the archive"),
    "business": Scope(" for the business account", " for a business account"),
    "mobile": Scope(" on the mobile app", " through the mobile app"),
    "sandbox": Scope(" in the sandbox", " in a sandbox"),
    "partner": Scope(" through the partner network", " through the partner network"),
    "eu": Scope(" in the EU region", " in the EU region"),
}

SEARCH_OBJECT = _obj("web", "the web", "the web", "query", {"limit": 10, "safe_search": True}, "search")
SEARCH_DESCRIPTION = "Searches the web and returns the most relevant pages."
SEARCH_ACTIONS = ("search the web", "look up on the web", "run a web search")

# ---------------------------------------------------------------------------------------------------------------
# Query phrasing
# ---------------------------------------------------------------------------------------------------------------

# (start of the query, its ending); "{a}" is the action phrase, "{A}" the same capitalized, "{C}" the clauses.
OPENERS: tuple[tuple[str, str], ...] = (
    ("{A} {C}", "."), ("Please {a} {C}", "."), ("Can you {a} {C}", "?"), ("Could you {a} {C}", "?"),
    ("I need to {a} {C}", "."), ("Help me {a} {C}", "."), ("I'd like to {a} {C}", "."), ("{A} {C}", ", please."),
    ("I want to {a} {C}", "."), ("Would you {a} {C}", "?"), ("Quick request: {a} {C}", "."),
    ("For my project, {a} {C}", "."),
)
# Openers after which an action phrase addressed to the assistant ("show me ...") reads wrong.
FIRST_PERSON_OPENERS = ("I need to", "I'd like to", "I want to", "Help me")
MULTI_CALL_LINKS = (", and also {rest}", ", then do the same {rest}", ", and repeat it {rest}")
ROW_CONNECTORS = (" Also, ", " Then ", " After that, ", " Additionally, ", " Next, ", " On top of that, ")
DISTRACTOR_CHOICES = (0, 0, 0, 0, 1, 1, 1, 2, 2, 3)
# Date pairs whose second date follows the first by 1..longest days.
DATE_SPANS = (("start_date", "end_date", 90), ("check_in", "check_out", 14))
